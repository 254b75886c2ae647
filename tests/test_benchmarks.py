"""Every script in benchmarks/ runs to its table at tiny sizes (the comparison study's smoke run
is in test_study.py), so none can break silently."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL
from tests.conftest import benchmark_script as script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_loss_cost_measures_the_chosen_points(tmp_path):
    # A process of its own, as a user runs it: the memory probe spawns the script's module.
    points = ["--sizes", "16", "--losses", "pc", "pc_q1024", "rkd_angle", "crd", "--repeats", "1"]
    command = [sys.executable, str(BENCHMARKS / "loss_cost.py"), "--device", "cpu", *points,
               "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "loss_cost_custom.json").read_text())
    assert [(p["loss"], p["batch"]) for p in report["points"]] == [
        ("pc", 16), ("pc_q1024", 16), ("rkd_angle", 16), ("crd", 16)
    ]  # fmt: skip
    assert all(p["seconds"] > 0 and p["peak_mib"] >= 0 for p in report["points"])
    table = (tmp_path / "loss_cost_custom.md").read_text()
    assert re.search(r"^\| pc \| [\d.]+ ms / \d+ MiB \|$", table, re.M), table


@pytest.mark.slow
def test_qat_weights_runs_its_grid_to_the_table(tmp_path, small, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cache = small.copy(tmp_path / "cache", ("data", "teacher", "distill"))
    args = [*SMALL, "--target", "cpu", "--cache", str(cache), "--out", str(tmp_path), "--grid",
            "0.5,2"]  # fmt: skip
    assert script("qat_weights").main(args) == 0
    record = json.loads((tmp_path / "qat_weights-cpu-default.json").read_text())
    assert [(r["beta"], r["gamma"]) for r in record["rows"]] == [(0.5, 2.0)]
    for row in record["rows"]:
        assert 0 < row["val_top1"] <= 1
        assert 0.5 < row["val_pc_triplet_agreement_fp32"] <= 1
    assert record["pick"] in record["rows"]
    table = (tmp_path / "qat_weights-cpu-default.md").read_text()
    assert re.search(r"^\| 0\.5 \| 2\.0 \| 0\.\d{4} \| 0\.\d{4} \|", table, re.M), table
    # The pipeline stopped after qat: no export, validate or register ran.
    folders = sorted(p.name.split("-")[0] for p in cache.iterdir() if p.is_dir())
    assert folders == ["data", "distill", "qat", "teacher"]


@pytest.mark.slow
def test_runtime_latency_times_the_bundles_of_an_export(tmp_path, small):
    (export,) = small.cache.glob("export-*")
    args = [str(export), "--threads", "1", "--block", "2", "--warmup", "1", "--iterations",
            "10", "--out", str(tmp_path), "--tag", "smoke"]  # fmt: skip
    assert script("runtime_latency").main(args) == 0
    report = json.loads((tmp_path / "runtime_latency-smoke.json").read_text())
    assert set(report["results"]) == {"cpu-fp32", "cpu-int8"}
    for row in report["results"].values():
        assert row["iterations_1t"] == 2 * 5
        assert 0 < row["p50_ms_1t"] <= row["p99_ms_1t"]
    (ratio,) = report["ratios"]
    assert ratio["int8"] == "cpu-int8"
    assert ratio["size_ratio"] > 2  # int8 weights: a quarter of the bytes, plus the graph
    assert ratio["speedup_1t"] > 0
    assert "| cpu-int8 |" in (tmp_path / "runtime_latency-smoke.md").read_text()


@pytest.mark.slow
def test_full_profile_runs_its_students_at_tiny_sizes(tmp_path):
    tiny = ["data.train_limit=300", "teacher.model=tiny_cnn",
            "teacher.train={epochs: 1, batch_size: 64, lr: 0.003, augment: true}",
            "distill.student=tiny_cnn", "distill.train.epochs=1", "distill.train.batch_size=64",
            "distill.train.lr=0.003", "distill.train.recalibrate_bn=true",
            "distill.pc_eval_limit=200"]  # fmt: skip
    args = ["--work", str(tmp_path / "work"), "--out", str(tmp_path), *tiny]
    assert script("full_profile").main(args) == 0
    report = json.loads((tmp_path / "full_profile.json").read_text())
    assert 0 < report["teacher"]["metrics"]["test_top1"] <= 1
    assert list(report["students"]) == list(script("full_profile").VARIANTS)
    for row in report["students"].values():
        assert 0 < row["metrics"]["test_top1"] <= 1
        assert 0.5 < row["metrics"]["test_pc_triplet_agreement"] <= 1
    table = (tmp_path / "full_profile.md").read_text()
    assert len(re.findall(r"^\| (pc|scratch)", table, re.M)) == 3


@pytest.mark.slow
def test_stream_memory_measures_every_stage_afresh_at_n_and_2n(tmp_path):
    bench = script("stream_memory")
    stale = tmp_path / "work" / "cache-32px-200" / "stale"
    stale.parent.mkdir(parents=True)
    stale.write_text("a stage cached by an earlier run")
    args = ["--n", "200", "--size", "32", "--test", "60", "--teacher-epochs", "0",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path),
            "distill.student=tiny_cnn", "distill.train.epochs=5", "distill.train.batch_size=32",
            "distill.train.lr=0.003"]  # fmt: skip
    assert bench.main(args) == 0
    assert not stale.exists()  # the cache was emptied: every stage ran, none was read back
    runs = json.loads((tmp_path / "stream_memory.json").read_text())["runs"]
    assert list(runs) == ["200", "400"]
    assert all(list(r) == list(bench.STAGES) for r in runs.values())
    assert all(200 < s["rss_mb"] < 8000 for r in runs.values() for s in r.values())
    assert len(list((tmp_path / "work" / "fashion-32px-400").rglob("*.png"))) == 400 + 60
    table = (tmp_path / "stream_memory.md").read_text()
    assert re.findall(r"^\| (data|teacher|distill) \|", table, re.M) == list(bench.STAGES)


def test_gpu_check_is_valid_bash_naming_files_that_exist():
    """benchmarks/gpu_check.sh runs only on a GPU machine; here: its syntax, and every script
    and test file it names is in the repository."""
    path = BENCHMARKS / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    named = re.findall(r"\b((?:benchmarks|tests)/\w+\.py)\b", path.read_text())
    assert len(named) >= 3
    root = BENCHMARKS.parent
    assert [n for n in named if not (root / n).is_file()] == []
    modules = re.findall(r"python3 -m (edgepc[\w.]+)", path.read_text())
    assert modules
    assert all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.slow
def test_students_measures_each_target_of_a_torchvision_student(tmp_path, monkeypatch):
    script("int8_speed")  # students.py takes onnxruntime's own quantizer from it
    students = script("students")
    # a speed plan that keeps nothing float (the choice: tests/test_speed_plan.py)
    empty = students.speed_plan.SpeedPlan({})
    monkeypatch.setattr(students.speed_plan, "choose", lambda *args: empty)
    result = students.main(["--archs", "mobilenet_v3_small", "--sizes", "32", "--threads", "1",
                            "--iterations", "4", "--block", "2", "--warmup", "1",
                            "--out", str(tmp_path)])  # fmt: skip
    (record,) = result["records"]
    facts, timing = record["facts"], record["timing"]
    assert facts["mobile"]["xnnpack_whole_graph"]
    assert facts["mobile"]["int8_layers"] == facts["mobile"]["layers"] == 107
    # hard activations, and the means after them (the one after a ReLU is int8)
    assert facts["cpu"]["layers"] - facts["cpu"]["int8_layers"] == 19 + 9 + 9
    assert facts["jetson"]["tensorrt_check"]["per_channel"] == 52 + 2  # an int8 weight each
    assert facts["mb"]["jetson int8"] < 0.4 * facts["jetson"]["fp32_mb"]
    for name in ("cpu int8", "mobile int8"):
        assert timing[name]["speed_vs_fp32_1t"] > 0
    assert timing["cpu int8"]["speed_vs_control_1t"] > 0
    planned = facts["cpu planned"]
    assert planned == {"plan": facts["cpu"]["plan"], "trials": [], "float_by_speed": 0}
    assert timing["cpu int8 planned"]["speed_vs_control_1t"] > 0
    table = (tmp_path / "students.md").read_text()
    assert "| mobilenet_v3_small | 32 |" in table
    assert "- mobilenet_v3_small, mobile: int8 layers: 107 of 107" in table
    assert result["meta"]["cpu"] in table


def test_train_speed_times_each_format(tmp_path):
    result = script("train_speed").main(["--nets", "tiny_cnn@28", "--batch", "8", "--steps", "2",
                                         "--block", "1", "--out", str(tmp_path)])  # fmt: skip
    rates = result["rows"]["tiny_cnn@28"]
    assert set(rates) == {"fp32", "channels_last", "channels_last + bf16"}
    assert all(rate > 0 for rate in rates.values())
    table = (tmp_path / "train_speed.md").read_text()
    assert "| tiny_cnn@28 |" in table
    assert result["meta"]["cpu"] in table
