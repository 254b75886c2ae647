"""The on-device scripts run with numpy and the runtime alone (torch, edgepc and mlflow made
unimportable) and reproduce the validate stage; their pc_* port equals edgepc's metrics."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepc.coherence import coherence_metrics
from edgepc.pipelines.deploy import validate_bundle
from tests.conftest import bundle

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "devices"))
import common  # noqa: E402  (devices/common.py, the scripts' shared helper)

BLOCKED = ("torch", "edgepc", "mlflow", "torchvision")


@pytest.fixture(scope="module")
def blocker(tmp_path_factory):
    """A folder that, first on PYTHONPATH, makes the named packages fail to import."""

    def make(*extra: str) -> Path:
        folder = tmp_path_factory.mktemp("blocked")
        for name in (*BLOCKED, *extra):
            (folder / name).mkdir()
            (folder / name / "__init__.py").write_text(
                f"raise ImportError('{name} is blocked: device scripts must not need it')"
            )
        return folder

    return make


def run_script(target: str, folder: Path, blocked: Path, *args: str):
    script = PROJECT / "devices" / target / "validate.py"
    env = {"PYTHONPATH": str(blocked), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, str(script), str(folder), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_numpy_metrics_equal_edgepc_metrics():
    rng = np.random.default_rng(0)
    for n, d_s, d_t in [(3, 2, 2), (41, 8, 5), (400, 16, 32)]:
        student = rng.standard_normal((n, d_s)).astype(np.float32)
        teacher = rng.standard_normal((n, d_t)).astype(np.float32)
        student[1] = student[2]  # ties in every other anchor's row
        teacher[:, 0] = np.round(teacher[:, 0])
        expected = coherence_metrics(torch.from_numpy(student).double(),
                                     torch.from_numpy(teacher).double()).as_dict()  # fmt: skip
        assert common.coherence_metrics(student, teacher, block=64) == pytest.approx(
            expected, abs=1e-12
        )


def test_latency_summary_follows_edgepc_measure():
    times = [float(t) for t in range(1, 101)]
    summary = common.summarise(times, warmup=5)
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
    stage = validate_bundle(folder, threads=[1], warmup=5, iterations=50)
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
    assert "Traceback" not in wrong.stderr + no_runtime.stderr + tampered.stderr
