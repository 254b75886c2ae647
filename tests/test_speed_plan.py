"""Layers kept float: by name (``qat.float_layers``) and by speed on the cpu target
(:mod:`edgepc.export.speed_plan`), checked on what onnxruntime runs. The choice itself reads
timings, so its tests script the timer: they check what it does with the numbers it gets."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from edgepc.export import speed_plan
from edgepc.export.inspect import float_compute, onnxruntime_ops
from edgepc.models import EmbeddingModel
from edgepc.quant import convert, prepare
from edgepc.targets import TARGETS

DEPTHWISE = ["net.1", "net.4"]
POINTWISE = ["net.2", "net.5"]


class Student(nn.Module):
    """conv → (depthwise → 1×1) × 2 → pool → linear."""

    def __init__(self) -> None:
        super().__init__()

        def block() -> list[nn.Module]:
            return [nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1), nn.ReLU()]

        head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *block(), *block(), *head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return EmbeddingModel(Student(), "net.8").eval(), torch.randn(8, 3, 16, 16)


def cpu_ops(student, keep: dict[str, str], folder) -> tuple[dict, Counter]:
    model, images = student
    quant = prepare(model, "cpu", images, qat=False, keep_float=keep)
    quant.calibrate([images])
    plan = {layer.layer: layer for layer in quant.plan.layers}
    return plan, onnxruntime_ops(TARGETS["cpu"].write(convert(quant), images[:2], folder, True))


def test_a_run_of_layers_kept_float_by_pattern_runs_in_float_and_the_plan_says_why(
    student, tmp_path
):
    plan, ops = cpu_ops(student, {"net.[12]": "a probe said so"}, tmp_path)
    floats = [name for name, layer in plan.items() if not layer.int8]
    assert floats == ["net.1", "net.2", "net.3"]  # net.3: the ReLU after them
    assert plan["net.1"].reason == plan["net.2"].reason == "a probe said so"
    assert {plan[name].kind for name in DEPTHWISE} == {"depthwise conv"}
    assert {plan[name].kind for name in POINTWISE} == {"1×1 conv"}
    assert plan["net.0"].kind == "conv"
    assert ops["com.microsoft.QLinearConv"] == 3, ops  # the stem and the second block
    assert sum(float_compute(ops).values()) == 2, ops  # the first block


def test_onnxruntime_quantizes_a_float_conv_between_int8_ones_back_to_int8(student, tmp_path):
    """What the speed plan checks for each trial: a lone float conv between a DequantizeLinear
    and a QuantizeLinear runs as QLinearConv (onnxruntime quantizes its weight itself)."""
    plan, ops = cpu_ops(student, {"net.[14]": "depthwise"}, tmp_path)
    assert [name for name, layer in plan.items() if not layer.int8] == DEPTHWISE
    assert ops["com.microsoft.QLinearConv"] == 5, ops
    assert not float_compute(ops), ops


def scripted(monkeypatch, kernels: dict[str, float], trial_wins: list[bool], fp32_wins: bool):
    """Profiles where int8 kernels of ``kernels`` kinds take longer than fp32's; trials won or
    lost in the order of ``trial_wins``; the last comparison won by fp32 when ``fp32_wins``."""
    outcomes = iter(trial_wins)

    def profile(path, image):
        int8 = "int8" in str(path) or "trial" in str(path)
        return {kind: us * (2 if int8 else 1) for kind, us in kernels.items()}

    def latency(runners, warmup, iterations):
        if "fp32" in runners:
            return {"fp32": SimpleNamespace(p50_ms=1.0 if fp32_wins else 2.0),
                    "int8": SimpleNamespace(p50_ms=1.5)}  # fmt: skip
        win = next(outcomes)
        return {"current": SimpleNamespace(p50_ms=1.0),
                "trial": SimpleNamespace(p50_ms=0.5 if win else 1.0)}  # fmt: skip

    monkeypatch.setattr(speed_plan, "kernel_times", profile)
    monkeypatch.setattr(speed_plan, "interleaved_latency", latency)


def test_a_kind_goes_float_only_when_its_trial_makes_the_whole_file_faster(student, monkeypatch):
    model, images = student
    # the stem wins its trial; the depthwise convs (float after a float stem) lose theirs; 1×1
    # convs are never slower in int8: never tried
    scripted(monkeypatch, {"conv": 10.0, "depthwise conv": 10.0}, [True, False], False)
    plan = speed_plan.choose(model, TARGETS["cpu"], images)
    assert list(plan.keep_float) == ["net.0"]
    assert [(t["kind"], t["layers"], t["kept_float"]) for t in plan.trials] == [
        ("conv", 1, True), ("depthwise conv", 2, False)]  # fmt: skip
    assert (plan.fp32_ms, plan.int8_ms) == (2.0, 1.5)
    assert speed_plan.SpeedPlan.from_json(plan.to_json()) == plan


def test_a_trial_that_onnxruntime_quantizes_back_is_not_timed(student, monkeypatch):
    model, images = student
    scripted(monkeypatch, {"depthwise conv": 10.0}, [], False)  # no trial timed
    plan = speed_plan.choose(model, TARGETS["cpu"], images)
    assert plan.keep_float == {}
    assert plan.trials == [{"kind": "depthwise conv", "layers": 2, "kernels_us": [20.0, 10.0],
                            "requantized_by_runtime": True, "kept_float": False}]  # fmt: skip


def test_when_fp32_is_still_faster_every_layer_stays_float(student, monkeypatch):
    model, images = student
    scripted(monkeypatch, {}, [], True)  # no kind slower in int8, but the whole file is
    plan = speed_plan.choose(model, TARGETS["cpu"], images, keep_float={"net.0": "named"})
    assert plan.keep_float["net.0"] == "named"
    assert all(plan.keep_float[name].startswith("faster in float") for name in DEPTHWISE)
    assert set(plan.keep_float) == {"net.0", *DEPTHWISE, *POINTWISE, "net.7", "net.9"}
    assert plan.trials == []
    assert plan.int8_ms == plan.fp32_ms == 1.0


def test_speed_plans_are_made_for_onnxruntime_files_only(student):
    model, images = student
    with pytest.raises(ValueError, match="not ai-edge-litert"):
        speed_plan.choose(model, TARGETS["mobile"], images)


def test_kernel_times_name_the_plans_kinds_in_both_files(student, tmp_path):
    """onnxruntime's profiler, its nodes read back as the plan's kinds: fp32 Conv / FusedConv /
    Gemm and int8 QLinearConv / QGemm alike."""
    model, images = student
    (tmp_path / "int8").mkdir()
    plan, _ = cpu_ops(student, {}, tmp_path / "int8")
    (tmp_path / "fp32").mkdir()
    fp32 = TARGETS["cpu"].write(model, images[:2], tmp_path / "fp32", False)
    image = images[:1].numpy()
    kinds = {p.kind for p in plan.values()}
    for path in (fp32, tmp_path / "int8" / "model.onnx"):
        times = speed_plan.kernel_times(path, image)
        assert {"conv", "depthwise conv", "1×1 conv", "linear"} <= set(times) <= kinds, times
        assert all(us > 0 for us in times.values()), times
