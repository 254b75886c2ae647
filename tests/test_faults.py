"""Faults: a pipeline killed at random points, a full disk, and pipelines that meet each other
on one cache and store. Each ends with the artifacts of a clean run (the session's shared
:func:`tests.conftest.small` run) and nothing lost."""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mlflow
from edgepc.distill.trainer import atomic_save
from edgepc.files import DiskFullError, atomic_path, remove_stale_temporaries
from edgepc.pipelines.runner import STAGES
from tests.conftest import start_pipeline, start_ui, stop_ui
from tests.test_distributed import TINY

STARTED = re.compile(r"^\[(\w+)\] running in ")

# The files a rerun must reproduce exactly: weights and deployable files (not timings, plots
# or run ids). Checkpoints written with torch.save differ in their zip's random id, so weights
# are compared by content.
UNTIL_DISTILL = ("--until", "distill")
FINAL = ("teacher.pt", "student.pt", "qat_student.pt", "model.onnx", "testset.npz")


def digest(path: Path) -> str:
    """sha256 of a file, or of its arrays for torch and numpy archives (zip metadata varies)."""
    h = hashlib.sha256()
    if path.suffix in (".pt", ".npz"):
        arrays = (torch.load(path, weights_only=True) if path.suffix == ".pt"
                  else dict(np.load(path)))  # fmt: skip
        for key in sorted(arrays):
            h.update(key.encode() + np.ascontiguousarray(arrays[key]).tobytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def finals(cache: Path) -> dict[str, str]:
    return {str(p.relative_to(cache)): digest(p) for p in sorted(cache.rglob("*"))
            if p.name in FINAL}  # fmt: skip


def trained(files: dict[str, str]) -> dict[str, str]:
    """The files of a run up to distill: the teacher's and the student's weights."""
    return {k: v for k, v in files.items() if Path(k).name in ("teacher.pt", "student.pt")}


def by_stage(files: dict[str, str]) -> dict[str, str]:
    """``files`` keyed by stage and file name, without the stage folder's key."""
    return {f"{Path(k).parent.name.split('-')[0]}/{Path(k).name}": v for k, v in files.items()}


def leftovers(cache: Path) -> list[Path]:
    """Temporary files of an interrupted write (edgepc.files names them .<name>.<pid>.tmp)."""
    return [p for p in cache.rglob(".*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def clean(small):
    """The uninterrupted run: its final files and how long each stage took."""
    assert list(small.durations) == [s.name for s in STAGES]
    return finals(small.cache), small.durations


@pytest.mark.slow
@pytest.mark.parametrize(
    "seed", [0, *(pytest.param(s, marks=pytest.mark.exhaustive) for s in (1, 2))]
)
def test_kill_9_at_a_random_point_of_every_stage_then_resume(tmp_path, clean, seed):
    """SIGKILL once inside each stage in turn, at a random moment of it; every rerun resumes.
    The last rerun finishes with the clean run's weights and files, and no temporary file or
    RUNNING MLflow run is left. Seeds 1 and 2 (other moments) run with ``-m exhaustive``."""
    expected, durations = clean
    rng = random.Random(seed)
    order = list(durations)
    cache, killed = tmp_path / "cache", []  # (stage aimed at, stage the kill landed in)
    before = tmp_path / "before"  # the cache as the last kill left it
    for stage in order:
        delay = rng.uniform(0, 0.5 * durations[stage])  # of the stage as the clean run took it
        for _ in range(5):
            if cache.exists():
                shutil.copytree(cache, before)
            run = start_pipeline(cache, tmp_path)
            read_until(run, stage)
            time.sleep(delay)
            run.send_signal(signal.SIGKILL)
            ended = run.wait() != -signal.SIGKILL
            later = [m[1] for line in run.stdout if (m := STARTED.match(line))]
            landed = stage if ended else (later[-1] if later else stage)
            if not ended and landed == stage:
                break
            # The stage ended sooner than in the clean run (a busy machine is uneven): back to
            # the cache the last kill left, and kill sooner.
            shutil.rmtree(cache)
            if before.exists():
                shutil.move(before, cache)
            delay /= 4
        shutil.rmtree(before, ignore_errors=True)
        killed.append((stage, landed))
    finish = start_pipeline(cache, tmp_path)
    out = finish.communicate(timeout=900)[0]
    assert finish.returncode == 0, out[-3000:]
    assert [landed for _, landed in killed] == order  # every stage hit
    assert finals(cache) == expected
    assert leftovers(cache) == []
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(ids, "attributes.status = 'RUNNING'")
    # Each killed invocation shows FAILED (status "killed"); one killed in register may have
    # ended its parent run just before the kill.
    parents = client.search_runs(ids, "tags.`edgepc.kind` = 'pipeline'")
    dead = [r for r in parents if r.data.tags.get("edgepc.status") == "killed"]
    assert len(dead) >= len(killed) - 1
    assert all(r.info.status == "FAILED" for r in dead)


def read_until(run: subprocess.Popen, stage: str) -> str:
    """The run's output up to the line where ``stage`` starts."""
    seen = []
    for line in run.stdout:
        seen.append(line)
        if (m := STARTED.match(line)) and m[1] == stage:
            return "".join(seen)
    raise AssertionError(f"the run ended before {stage} started:\n{''.join(seen)[-3000:]}")


def sync_to(address: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "edgepc.tracking.sync", "--uri", address]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})


def stage_runs(store: str) -> dict[str, list]:
    """The store's runs by name, oldest first."""
    client = mlflow.MlflowClient(store)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs: dict[str, list] = {}
    for run in sorted(client.search_runs(ids), key=lambda r: r.info.start_time):
        runs.setdefault(run.info.run_name, []).append(run)
    return runs


@pytest.mark.slow
def test_mlflow_server_killed_mid_run_training_goes_on_and_sync_replays(tmp_path, small, clean):
    """tracking.on_error=spool (the default): the server dies while distill trains (data and
    teacher come from the clean run's cache); the pipeline finishes with the clean run's files,
    spooling its runs; once a server is back, sync replays them: every stage run FINISHED with
    its metrics, artifacts and registry."""
    store, spool = f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "spool"
    ui, address = start_ui(store)
    env = {"MLFLOW_TRACKING_URI": address, "EDGEPC_SPOOL": str(spool)}
    cache = small.copy(tmp_path / "cache", ("data", "teacher"))
    run = start_pipeline(cache, tmp_path, env=env)
    out = read_until(run, "distill")
    stop_ui(ui, signal.SIGKILL)
    out += run.communicate(timeout=900)[0]
    assert run.returncode == 0, out[-3000:]
    assert f"warning: MLflow at {address} failed" in out
    assert finals(tmp_path / "cache") == clean[0]
    assert len(list(spool.glob("*.jsonl"))) == 1
    ui, address = start_ui(store)  # back, on another port
    try:
        sync = sync_to(address, env)
    finally:
        stop_ui(ui)
    assert sync.returncode == 0, sync.stderr[-3000:]
    assert "replayed" in sync.stdout
    assert list(spool.iterdir()) == []
    runs = stage_runs(store)
    (parent,) = runs["cpu"]
    assert parent.info.status == "FINISHED"
    for stage in STAGES:
        (child,) = runs[stage.name]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        result = json.loads(next((tmp_path / "cache").glob(f"{stage.name}-*/result.json"))
                            .read_text()) if stage.cached else None  # fmt: skip
        if result is not None:  # nothing lost: each stage's metrics, as it computed them
            for key, value in result["metrics"].items():
                assert child.data.metrics[key] == pytest.approx(value), (stage.name, key)
    client = mlflow.MlflowClient(store)
    distill = runs["distill"][0].info.run_id
    assert "student.pt" in [
        f.path.split("/")[-1] for f in client.list_artifacts(distill, "distill")
    ]
    aliases = client.get_registered_model("edgepc-cpu").aliases
    assert set(aliases) == {"cpu-fp32", "cpu-int8"}


@pytest.mark.slow
def test_mlflow_server_killed_with_stop_ends_in_one_line_then_resumes(tmp_path, clean):
    """tracking.on_error=stop: the teacher's first metrics after the server died end the run
    with one line and exit 2; what was not recorded is spooled; after a sync, the rerun resumes
    the teacher from its last epoch and trains the clean run's weights."""
    store, spool = f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "spool"
    ui, address = start_ui(store)
    env = {"MLFLOW_TRACKING_URI": address, "EDGEPC_SPOOL": str(spool)}
    stop = (*UNTIL_DISTILL, "tracking.on_error=stop")
    try:
        run = start_pipeline(tmp_path / "cache", tmp_path, *stop, env=env)
        out = read_until(run, "teacher")
        os.killpg(ui.pid, signal.SIGKILL)
        out += run.communicate(timeout=900)[0]
        assert run.returncode == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        assert f"MLflow at {address} failed" in errors[0]
        assert "stopped" in errors[0]
        assert "Traceback" not in out
        assert (next((tmp_path / "cache").glob("teacher-*")) / "training.pt").exists()
        ui.wait(timeout=30)
        ui, address = start_ui(store)
        env["MLFLOW_TRACKING_URI"] = address
        sync = sync_to(address, env)
        assert sync.returncode == 0, sync.stderr[-3000:]
        again = start_pipeline(tmp_path / "cache", tmp_path, *stop, env=env)
        out = again.communicate(timeout=900)[0]
        assert again.returncode == 0, out[-3000:]
    finally:
        stop_ui(ui)
    assert finals(tmp_path / "cache") == trained(clean[0])
    runs = stage_runs(store)
    assert [r.info.status for r in runs["cpu"]] == ["FAILED", "FINISHED"]
    assert [r.info.status for r in runs["teacher"]] == ["FAILED", "FINISHED"]
    assert "loss" in runs["teacher"][0].data.metrics  # the epoch that met the dead server


def test_npy_rows_writes_blocks_and_a_full_disk_names_the_file_that_filled_it(tmp_path):
    import numpy as np

    from edgepc.files import npy_rows

    blocks = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 3), np.float32)]
    with npy_rows(tmp_path / "a.npy", 3) as append:
        for block in blocks:
            append(block)
    np.testing.assert_array_equal(
        np.load(tmp_path / "a.npy", mmap_mode="r"), np.concatenate(blocks)
    )
    with (
        pytest.raises(ValueError, match="2 rows written, 5 announced"),
        npy_rows(tmp_path / "b.npy", 5) as append,
    ):
        append(blocks[0])

    def nested() -> None:
        with npy_rows(tmp_path / "outer.npy", 1) as outer, npy_rows(tmp_path / "inner.npy", 1):
            outer(blocks[1])
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"while writing inner\.npy"):  # not outer.npy
        nested()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]  # nothing half-written


def test_disk_full_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """A writer that fills the disk half way (ENOSPC from write): a typed one-line error, the
    previous checkpoint intact, no temporary file."""
    path = tmp_path / "training.pt"
    atomic_save({"epoch": 1}, path)
    real_save = torch.save

    def full(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=r"^no space left on the disk of .* training\.pt"):
        atomic_save({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["training.pt"]

    def broken_writer(tmp: Path) -> None:
        tmp.write_text("{")
        raise ValueError("a writer's own error")

    with pytest.raises(ValueError, match="own error"), atomic_path(tmp_path / "x.json") as tmp:
        broken_writer(tmp)  # not the disk: its own error, and no temporary left either
    assert [p.name for p in tmp_path.iterdir()] == ["training.pt"]


def test_a_killed_writers_temporaries_are_removed_and_a_live_ones_kept(tmp_path):
    """kill -9 runs no cleanup: the temporary file of a dead writer stays until the work
    resumes; one of a live writer (this process) is not touched."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / "bundle" / f".model.onnx.{gone.pid}.tmp.onnx"
    dead.parent.mkdir()
    dead.write_bytes(b"half")
    live = tmp_path / f".splits.pt.{os.getpid()}.tmp.pt"
    live.write_bytes(b"being written")
    (tmp_path / ".lock").write_text("")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".lock", live.name, "bundle"]


@pytest.mark.slow
def test_disk_full_in_a_real_pipeline_then_rerun(tmp_path, clean):
    """The pipeline process may write no file over 1.2 MB (prlimit's RLIMIT_FSIZE: the kernel
    refuses the write with EFBIG, as a full disk does with ENOSPC; Python ignores SIGXFSZ): on
    the whole test split, the teacher's 1.28 MB test embeddings fail (MLflow's database is under
    1 MB then). One line, exit 2, nothing half-written; the rerun with space resumes and ends with
    the clean run's weights (the test split does not change them)."""
    cache = tmp_path / "cache"
    whole = (*UNTIL_DISTILL, "data.test_limit=null")
    run = start_pipeline(cache, tmp_path, *whole, limit=["prlimit", "--fsize=1200000"])
    out = run.communicate(timeout=900)[0]
    assert run.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "no space left" in errors[0]
    assert "teacher_outputs while writing test_embeddings.npy" in errors[0]
    assert "Traceback" not in out
    assert leftovers(cache) == []
    teacher = next(cache.glob("teacher-*"))
    assert not (teacher / "result.json").exists()
    assert not (teacher / "teacher_outputs" / "test_embeddings.npy").exists()
    again = start_pipeline(cache, tmp_path, *whole)
    out = again.communicate(timeout=900)[0]
    assert again.returncode == 0, out[-3000:]
    assert re.search(r"^data\s+cached", out, re.M)
    assert by_stage(finals(cache)) == by_stage(trained(clean[0]))


@pytest.mark.slow
def test_two_pipelines_at_once_on_one_cache_compute_each_stage_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # fmt: skip
    command = [sys.executable, "-m", "edgepc.pipelines.run", "cpu", "--cache",
               str(tmp_path / "cache"), *TINY, "distill.train.recalibrate_bn=true"]  # fmt: skip
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]  # fmt: skip
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
    for stage in ("data", "teacher", "distill"):
        statuses = sorted(re.search(rf"^{stage}\s+(\w+)", out, re.M)[1] for out, _ in outputs)
        assert statuses == ["cached", "ran"], stage  # the second waited, then reused the first's
    assert any("waiting: another pipeline" in out for out, _ in outputs)
    folders = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert folders == ["data", "distill", "teacher"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    finished = [r for r in client.search_runs(ids) if r.info.status == "FINISHED"]
    assert len(finished) == 8  # two parents with three stage runs each
    assert not list(Path(os.environ["EDGEPC_SPOOL"]).glob("*.jsonl"))  # all in the store
