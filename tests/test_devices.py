"""The on-device core (edgepc_device) runs from a copy of its folder with numpy and the runtime
alone (torch, edgepc and mlflow made unimportable) and reproduces the validate stage; its pc_*
port equals edgepc's metrics."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edgepc_device
from edgepc.coherence import coherence_metrics
from edgepc.pipelines.deploy import validate_bundle
from edgepc_device import jetson
from edgepc_device.bundle import load_testset
from edgepc_device.metrics import coherence_metrics as numpy_metrics
from edgepc_device.timing import summarise
from tests.conftest import bundle

BLOCKED = ("torch", "edgepc", "mlflow", "torchvision")


@pytest.fixture(scope="module")
def blocker(tmp_path_factory):
    """A folder that, first on PYTHONPATH, makes the named packages fail to import, with a copy
    of the edgepc_device folder beside them (as it reaches a device: copied as is)."""

    def make(*extra: str) -> Path:
        folder = tmp_path_factory.mktemp("blocked")
        shutil.copytree(Path(edgepc_device.__file__).parent, folder / "edgepc_device",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        for name in (*BLOCKED, *extra):
            (folder / name).mkdir()
            (folder / name / "__init__.py").write_text(
                f"raise ImportError('{name} is blocked: device scripts must not need it')"
            )
        return folder

    return make


def run_script(target: str, folder: Path, blocked: Path, *args: str):
    """``python3 -m edgepc_device TARGET BUNDLE ...`` from the copied folder, in another cwd."""
    env = {"PYTHONPATH": str(blocked), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "edgepc_device", target, str(folder), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                          cwd=folder.parent)  # fmt: skip


def test_numpy_metrics_equal_edgepc_metrics():
    rng = np.random.default_rng(0)
    for n, d_s, d_t in [(3, 2, 2), (41, 8, 5), (400, 16, 32)]:
        student = rng.standard_normal((n, d_s)).astype(np.float32)
        teacher = rng.standard_normal((n, d_t)).astype(np.float32)
        student[1] = student[2]  # ties in every other anchor's row
        teacher[:, 0] = np.round(teacher[:, 0])
        expected = coherence_metrics(torch.from_numpy(student).double(),
                                     torch.from_numpy(teacher).double()).as_dict()  # fmt: skip
        assert numpy_metrics(student, teacher, block=64) == pytest.approx(expected, abs=1e-12)


def test_latency_summary_follows_edgepc_measure():
    times = [float(t) for t in range(1, 101)]
    summary = summarise(times, warmup=5)
    assert summary["p50_ms"] == 50.5
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert summary["iterations"] == 100
    assert summary["throughput"] == pytest.approx(1000 / 50.5)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cpu", "mobile"])
def test_device_script_reproduces_the_validate_stage_without_torch(
    tmp_path, setup, blocker, target
):
    manifest = bundle(tmp_path, setup, target, "ptq")
    folder = tmp_path / manifest.name
    stage = validate_bundle(folder)
    out = tmp_path / "report.json"
    done = run_script(target, folder, blocker(), "--out", str(out), "--threads", "1", "2",
                      "--iterations", "50")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["accuracy"]["top1"] == stage["test_top1"]  # exactly the same predictions
    for key in ("pc_rank_gap", "pc_triplet_agreement", "pc_spearman"):
        assert report["accuracy"][key] == pytest.approx(stage[f"test_{key}"], abs=1e-9)
    assert report["accuracy"]["images"] == 300
    assert report["bundle"]["verified"] is True
    assert report["bundle"]["model_sha256"] == manifest.entry(manifest.model).sha256
    assert set(report["latency"]) == {"1t", "2t"}
    for timing in report["latency"].values():
        assert 0 < timing["p50_ms"] <= timing["p90_ms"] <= timing["p99_ms"]
        assert timing["iterations"] == 50
    assert report["device"]["runtime"] in ("onnxruntime", "ai-edge-litert", "tflite-runtime")
    assert report["device"]["cores"] >= 1
    assert report["peak_rss_mb"] > 0


@pytest.mark.slow
def test_device_scripts_refuse_tampered_bundles_and_missing_runtimes(tmp_path, setup, blocker):
    manifest = bundle(tmp_path, setup, "cpu", "fp32")
    folder = tmp_path / manifest.name
    blocked = blocker()
    wrong = run_script("mobile", folder, blocked, "--out", str(tmp_path / "r.json"))
    assert wrong.returncode == 2
    assert "is a 'cpu' bundle; this script runs 'mobile' ones" in wrong.stderr
    no_runtime = run_script("cpu", folder, blocker("onnxruntime"))
    assert no_runtime.returncode == 2
    assert "onnxruntime is not installed here: pip install numpy onnxruntime" in no_runtime.stderr
    model = folder / manifest.model
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    tampered = run_script("cpu", folder, blocked, "--out", str(tmp_path / "r.json"))
    assert tampered.returncode == 2
    assert "does not match its sha256" in tampered.stderr
    assert not (tmp_path / "r.json").exists()
    (folder / "manifest.json").write_bytes(b'{"name": "\xff\xfe"}')  # not UTF-8
    garbled = run_script("cpu", folder, blocked)
    assert garbled.returncode == 2
    assert "manifest.json is not valid JSON" in garbled.stderr
    assert "Traceback" not in wrong.stderr + no_runtime.stderr + tampered.stderr + garbled.stderr


@pytest.mark.slow
def test_ingest_attaches_reports_to_the_export_run_and_compare_lines_them_up(
    tmp_path, setup, blocker, monkeypatch
):
    from edgepc.devices import compare, ingest
    from edgepc.devices.report import ReportError
    from edgepc.export.bundle import write_bundle
    from edgepc.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker(uri)
    model, int8, testset, spec, classes = setup
    example = torch.from_numpy(load_testset(testset.parent, {
        "testset": testset.name, "normalisation": spec.model_dump()})[0][:2])  # fmt: skip
    reports = {}
    with tracker.run("export", {"edgepc.stage": "export", "edgepc.target": "cpu"}) as run_id:
        for source in ("fp32", "ptq"):  # as the export stage does: bundle, then its artifacts
            name = "cpu-fp32" if source == "fp32" else "cpu-int8"
            chosen = model if source == "fp32" else int8["cpu"]
            write_bundle(tmp_path / name, chosen, example, "cpu", source, testset, spec,
                         list(classes), run_id)  # fmt: skip
            tracker.log_artifact(tmp_path / name, f"export/{name}")
            reports[name] = tmp_path / f"{name}.json"
            done = run_script("cpu", tmp_path / name, blocker(), "--out", str(reports[name]),
                              "--threads", "1", "--iterations", "20")  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
    assert ingest.main([str(reports["cpu-fp32"]), "--device", "orin nano"]) == 0
    assert ingest.main([str(reports["cpu-int8"]), "--device", "orin nano"]) == 0
    run = tracker.runs.find(run_id)
    top1 = json.loads(reports["cpu-int8"].read_text())["accuracy"]["top1"]
    assert run["metrics"]["orin-nano.int8_test_top1"] == top1
    assert run["metrics"]["orin-nano.fp32_p50_ms_1t"] > 0
    assert "onnxruntime" in run["tags"]["edgepc.device.orin-nano"]
    assert tracker.runs.read_artifact(run_id, "devices/orin-nano/cpu-int8.json") is not None
    # A report of another model, of an unknown run, or malformed: refused, nothing attached.
    forged = json.loads(reports["cpu-int8"].read_text())
    forged["bundle"]["model_sha256"] = "0" * 64
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    with pytest.raises(ReportError, match="another sha256"):
        ingest.ingest(tmp_path / "forged.json", tracker)
    forged["bundle"]["mlflow_run_id"] = "f" * 32
    (tmp_path / "lost.json").write_text(json.dumps(forged))
    with pytest.raises(ReportError, match="is not in"):
        ingest.ingest(tmp_path / "lost.json", tracker)
    (tmp_path / "bad.json").write_text('{"report_version": 1}')
    assert ingest.main([str(tmp_path / "bad.json")]) == 2
    rows = compare.collect(tracker.runs.of_stage("export"))
    assert [(r["device"], r["artifact"]) for r in rows] == [("orin-nano", "fp32"),
                                                            ("orin-nano", "int8")]  # fmt: skip
    assert compare.main(["--out", str(tmp_path / "compare.png")]) == 0
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert f"| orin-nano | cpu | int8 | {top1:.4f} |" in compare.table(rows)


def test_jetson_engine_cache_takes_only_a_matching_engine():
    meta = {"onnx_sha256": "a" * 64, "tensorrt": "10.3.0", "gpu": "Orin"}
    assert jetson.engine_is_current(meta, "a" * 64, "10.3.0", "Orin")
    assert not jetson.engine_is_current(None, "a" * 64, "10.3.0", "Orin")
    assert not jetson.engine_is_current(meta, "b" * 64, "10.3.0", "Orin")  # ONNX changed
    assert not jetson.engine_is_current(meta, "a" * 64, "8.6.2", "Orin")  # another TensorRT
    assert not jetson.engine_is_current(meta, "a" * 64, "10.3.0", "H100")  # another GPU
    assert jetson.power_state() == {}  # no nvpmodel / jetson_clocks on this machine


@pytest.mark.slow
def test_jetson_script_refuses_without_tensorrt_and_reports_nothing(tmp_path, setup, blocker):
    manifest = bundle(tmp_path, setup, "jetson", "ptq")
    folder = tmp_path / manifest.name
    blocked = blocker("tensorrt")  # absent here anyway; blocked so the test means the same
    out = tmp_path / "report.json"
    done = run_script("jetson", folder, blocked, "--out", str(out))
    assert done.returncode == 2
    assert "tensorrt is not importable here" in done.stderr
    assert "no numbers are reported without it" in done.stderr
    assert not out.exists()
    assert run_script("jetson", folder, blocked, "--iterations", "1").returncode == 2
    missing = run_script("jetson", folder, blocked, "--engine", str(tmp_path / "none.engine"))
    assert "does not exist" in missing.stderr
    cpu = bundle(tmp_path, setup, "cpu", "fp32")
    other = run_script("jetson", tmp_path / cpu.name, blocked)
    assert "is a 'cpu' bundle" in other.stderr
    assert "Traceback" not in done.stderr + missing.stderr + other.stderr


@pytest.mark.slow
def test_jetson_builder_refuses_without_tensorrt_and_checks_the_bundle(tmp_path, setup, blocker):
    manifest = bundle(tmp_path, setup, "jetson", "ptq")
    folder = tmp_path / manifest.name
    blocked = blocker("tensorrt")
    done = run_script("build-engine", folder, blocked)
    assert done.returncode == 2
    assert not (folder / "model.engine").exists()
    assert "tensorrt is not importable" in done.stderr  # this machine has no TensorRT
    assert run_script("build-engine", folder, blocked, "--max-batch", "0").returncode == 2
    cpu = bundle(tmp_path, setup, "cpu", "fp32")
    assert "is a 'cpu' bundle" in run_script("build-engine", tmp_path / cpu.name, blocked).stderr
    model = folder / manifest.model
    model.write_bytes(model.read_bytes() + b"\0")
    assert "does not match its sha256" in run_script("build-engine", folder, blocked).stderr


def test_the_command_names_its_commands():
    done = subprocess.run([sys.executable, "-m", "edgepc_device"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "give a command: cpu, mobile, jetson, build-engine" in done.stderr
