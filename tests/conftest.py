import fcntl
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepc.data import channel_stats, load_dataset, make_splits
from edgepc.distill.images import Normalisation
from edgepc.distill.trainer import TrainConfig, train
from edgepc.export.bundle import TESTSET, Normalise, write_bundle, write_testset
from edgepc.models import build_model
from edgepc.quant import convert
from edgepc.quant.finetune import ptq
from edgepc_device.bundle import normalise

CPU = torch.device("cpu")
# The cpu pipeline at the smallest size where every stage does real work (300 real training
# images; 1,200 validation and 1,000 test images evaluated in each stage).
PROJECT = Path(__file__).resolve().parents[1]  # the checkout the tests run in
SMALL = [
    "data.train_limit=300",
    "data.val_fraction=0.02",
    "data.test_limit=1000",
    "data.calibration_size=64",
    "teacher.model=tiny_cnn",
    "teacher.train={epochs: 4, batch_size: 32, lr: 0.003, augment: false}",
    "distill.student=tiny_cnn",
    "distill.train.epochs=2",
    "distill.train.batch_size=64",
    "distill.pc_eval_limit=300",
    "qat.train={epochs: 1, batch_size: 64, lr: 0.0003, alpha: 1.0, beta: 1.0, gamma: 1.0}",
    "qat.train_limit=200",
    "qat.pc_eval_limit=300",
    "qat.plain_qat=false",
    # a timed choice: two runs may choose differently, and the fault tests compare a killed run
    # with a clean one (the choice itself: tests/test_speed_plan.py)
    "qat.speed_plan=false",
    "export.ptq=false",
    "export.parity_size=300",
    "export.pc_eval_limit=300",
    "validation.latency={warmup: 2, iterations: 20, threads: [1]}",
    # Students trained on 300 images are not deployable: int8 may lose a few points of a low
    # top-1. The gate itself is tested in test_export.py.
    "validation.max_drop=10",
]
# A row of the summary table: stage, status, seconds, key metrics, MLflow run.
SUMMARY = re.compile(r"^(\w+) +(ran|cached) +([\d.]+) .*?([0-9a-f]{32}) *$", re.M)


def pytest_configure(config):
    """Under pytest-xdist, the workers share the cores: torch in each takes its share."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items):
    """Slow tests that do not need the shared run (:func:`small`) first, the tests that need it
    last: pytest-xdist gives each worker one half, so one starts on the slow tests while the
    other runs short ones as the shared run is made, then steals from the first."""
    items.sort(key=lambda item: 2 if "small" in item.fixturenames
               else 0 if item.get_closest_marker("slow") else 1)  # fmt: skip


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _spool(tmp_path_factory):
    """Tracking that a failing store spools stays out of the project (subprocesses inherit)."""
    os.environ["EDGEPC_SPOOL"] = str(tmp_path_factory.mktemp("spool"))


def random_rotation(dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=dtype))
    return q


def start_ui(uri: str) -> tuple[subprocess.Popen, str]:
    """``python -m edgepc.pipelines.ui`` over the store ``uri`` on a free port, answering: the
    process (its own group) and its address."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    ui = subprocess.Popen(
        [sys.executable, "-m", "edgepc.pipelines.ui", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2):
                return ui, address
        except OSError:
            time.sleep(0.5)
    stop_ui(ui)
    raise AssertionError("the MLflow UI did not answer within 120 s")


def stop_ui(ui: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    os.killpg(ui.pid, sig)
    ui.wait(timeout=30)


@contextmanager
def mlflow_ui(uri: str) -> Iterator[str]:
    """:func:`start_ui` for a block; yields its address and stops it afterwards."""
    ui, address = start_ui(uri)
    try:
        yield address
    finally:
        stop_ui(ui)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Tiny:
    """Real Fashion-MNIST images and two tiny CNNs trained on them, shared by the tests."""

    x: torch.Tensor  # 1,500 training images (uint8) and their labels
    y: torch.Tensor
    val_x: torch.Tensor  # 600 validation images of the same split
    val_y: torch.Tensor
    test_x: torch.Tensor  # the first 500 test images
    test_y: torch.Tensor
    norm: Normalisation
    teacher: torch.nn.Module  # trained on labels
    student: torch.nn.Module  # distilled from the teacher (α = β = 1)
    classes: tuple[str, ...]


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    d = load_dataset("fashion-mnist", download=False)
    s = make_splits(d.train_labels, train_limit=1500, seed=0)
    x, y = d.train_images[s.train], d.train_labels[s.train]
    norm = Normalisation(*map(tuple, channel_stats(x)))
    torch.manual_seed(0)
    teacher = build_model("tiny_cnn")
    train(teacher, x, y, norm, TrainConfig(epochs=4, lr=3e-3), CPU, progress=False)
    torch.manual_seed(1)
    student = build_model("tiny_cnn")
    config = TrainConfig(epochs=4, lr=3e-3, beta=1.0)
    train(student, x, y, norm, config, CPU, teacher=teacher, progress=False)
    teacher.eval()
    student.eval()
    val = s.val[:600]
    return Tiny(x, y, d.train_images[val], d.train_labels[val], d.test_images[:500],
                d.test_labels[:500], norm, teacher, student, tuple(d.classes))  # fmt: skip


@pytest.fixture(scope="session")
def setup(tiny, tmp_path_factory):
    """The tiny student, its PTQ int8 graph per target, and a test set file with 300 real test
    images."""
    targets = ("cpu", "mobile", "jetson")
    int8 = {t: convert(ptq(tiny.student, t, tiny.x[:256], tiny.norm)) for t in targets}
    folder = tmp_path_factory.mktemp("testset")
    teacher = torch.randn(300, 16).numpy()  # any reference embeddings of the first images
    testset = write_testset(folder / TESTSET, tiny.test_x[:300].numpy(),
                            tiny.test_y[:300].numpy(), teacher)  # fmt: skip
    spec = Normalise(mean=list(tiny.norm.mean), std=list(tiny.norm.std))
    return tiny.student, int8, testset, spec, tiny.classes


def bundle(tmp_path, setup, target, source):
    model, int8, testset, spec, classes = setup
    example = normalise(np.load(testset)["images"][:2], spec.mean, spec.std)
    chosen = model if source == "fp32" else int8[target]
    folder = tmp_path / f"{target}-{'fp32' if source == 'fp32' else 'int8'}"
    return write_bundle(folder, chosen, torch.from_numpy(example), target, source, testset,
                        spec, list(classes))  # fmt: skip


def benchmark_script(name: str):
    """benchmarks/<name>.py as a module (registered, so that its dataclasses resolve)."""
    path = PROJECT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory, worker_id) -> Path:
    """A temporary folder that every worker of this test session sees."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def start_pipeline(
    cache: Path,
    store: Path,
    *extra: str,
    env: dict | None = None,
    limit: list[str] = (),
    wrap: list[str] = (),
    stdout: int = subprocess.PIPE,
) -> subprocess.Popen:
    """The cpu pipeline on SMALL as a user starts it, one thread (the same arithmetic in every
    run), its output line by line; MLflow in ``store/mlflow.db``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", **(env or {})}  # fmt: skip
    command = [*wrap, *limit, sys.executable, "-m", "edgepc.pipelines.run", "cpu", "--cache",
               str(cache), "--no-progress", *SMALL, *extra]  # fmt: skip
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, text=True, env=env)


@dataclass(frozen=True)
class SmallRun:
    """One uninterrupted run of the cpu pipeline on SMALL (:func:`start_pipeline`)."""

    cache: Path
    # From the summary table, per stage:
    durations: dict[str, float]  # seconds it took
    statuses: dict[str, str]  # ran | cached
    run_ids: dict[str, str]  # its MLflow run

    def result(self, stage: str) -> dict:
        """The ``result.json`` of ``stage``: its metrics, files and facts."""
        return json.loads(next(self.cache.glob(f"{stage}-*/result.json")).read_text())

    def copy(self, to: Path, stages: tuple[str, ...] | None = None) -> Path:
        """A cache of one's own at ``to``: the run's stage folders (only ``stages``' if given);
        MLflow starts empty there (a stage read from the cache is logged again)."""
        to.mkdir(parents=True, exist_ok=True)
        for folder in self.cache.iterdir():
            if folder.is_dir() and (stages is None or folder.name.split("-")[0] in stages):
                shutil.copytree(folder, to / folder.name)
        return to


# The shared run's folder: output.txt (what the pipeline printed), then exit_code once it ended.
SMALL_RUN = "small-pipeline"


@pytest.fixture(scope="session", autouse=True)
def _start_small(request, shared_tmp) -> None:
    """Start the shared run in the background as soon as this session holds a test that needs
    it, once whichever pytest-xdist worker comes first: the workers run other tests meanwhile."""
    if not any("small" in item.fixturenames for item in request.session.items):
        return
    folder = shared_tmp / SMALL_RUN
    with (shared_tmp / f"{SMALL_RUN}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if folder.exists():
            return  # another worker started it
        folder.mkdir()
        # sh records the exit code after the pipeline's output, so any worker can wait for it.
        record = '"$@" > "$0/output.txt" 2>&1; echo $? > "$0/.code"; mv "$0/.code" "$0/exit_code"'
        start_pipeline(folder / "cache", folder, wrap=["sh", "-c", record, str(folder)],
                       stdout=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture(scope="session")
def small(shared_tmp) -> SmallRun:
    """The cpu pipeline on SMALL, run once per test session in a process of its own."""
    folder = shared_tmp / SMALL_RUN
    deadline = time.monotonic() + 900
    while not (folder / "exit_code").exists():
        assert time.monotonic() < deadline, f"the shared run in {folder} took over 15 minutes"
        time.sleep(0.5)
    output = (folder / "output.txt").read_text()
    assert (folder / "exit_code").read_text().strip() == "0", output[-3000:]
    rows = SUMMARY.findall(output)
    return SmallRun(folder / "cache", {s: float(seconds) for s, _, seconds, _ in rows},
                    {s: status for s, status, _, _ in rows},
                    {s: run for s, _, _, run in rows})  # fmt: skip
