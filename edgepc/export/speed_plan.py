"""Which layers of a student run faster in float than in int8, measured where the runtime runs as
it does on the device (the cpu target: onnxruntime on this CPU).

An int8 kernel wins or loses by kind: on an AVX2 CPU without VNNI, MobileNetV3-Small's 1×1
convolutions run 1.27× faster in int8 while its depthwise ones run slower, and each float layer
between int8 ones adds a DequantizeLinear and a QuantizeLinear. So the choice is made on the
whole file, kind by kind (the layers' ``kind`` in the precision plan). onnxruntime's profiler
first times each kind's kernels in the fp32 file and in the int8 file with every layer the
recipe can run in int8; each kind of conv or linear whose int8 kernels take longer is a
candidate. A candidate's layers go float when onnxruntime then runs them in float (a conv
between a DequantizeLinear and a QuantizeLinear it quantizes back: only a run of float layers,
or one at an end of the graph, stays float) and the whole file runs faster by more than
``margin`` (batch 1, 1 thread, interleaved turns of :func:`edgepc.measure.interleaved_latency`,
p50); they stay float for the next candidates' trials. Last, if the fp32 file still runs faster
than the chosen int8 one, every layer stays float: no int8 layer pays for its Q/DQ on this CPU.
One export per candidate (~15 s for MobileNetV3-Small).

For mobile and jetson this host is not the device, and no choice is made here.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from edgepc.export.inspect import INTEGER_WEIGHT_INPUT, float_compute, onnxruntime_ops
from edgepc.export.runtimes import open_runtime
from edgepc.export.writers import write_onnx
from edgepc.measure import interleaved_latency
from edgepc.models import EmbeddingModel
from edgepc.quant import PrecisionPlan, convert, prepare
from edgepc.targets import Target
from edgepc_device.runtimes import onnx_session_options, quiet_native_logs

if TYPE_CHECKING:
    import onnx

# A plan kind by the onnxruntime node that computes it, in fp32 and in int8 (QLinear* / QGemm).
PLAN_KIND = {"Conv depthwise": "depthwise conv", "Conv 1×1": "1×1 conv", "Conv other": "conv",
             "Gemm": "linear", "Add": "add", "Mul": "mul", "Sigmoid": "sigmoid",
             "Concat": "cat", "GlobalAveragePool": "mean", "ReduceMean": "mean"}  # fmt: skip
# The kinds a trial keeps float. onnxruntime runs any other op between a DequantizeLinear and a
# QuantizeLinear as its QLinear kernel anyway, and a conv or linear there too (it quantizes the
# float weight itself: its WeightBiasQuantization pass): a trial whose file onnxruntime runs
# with no more float convs than before is skipped.
WEIGHTED = {"conv", "depthwise conv", "1×1 conv", "linear"}


@dataclass(frozen=True)
class SpeedPlan:
    """The layers kept float for speed ({layer: why}) and the trials that chose them."""

    keep_float: dict[str, str]
    trials: list[dict] = field(default_factory=list)  # {kind, layers, int8_ms, float_ms ...}
    fp32_ms: float = 0.0
    int8_ms: float = 0.0  # of the chosen plan

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> SpeedPlan:
        return cls(**record)


def conv_kinds(graph: onnx.GraphProto) -> dict[str, str]:
    """{node name: its op, and for a convolution its kind: depthwise (groups > 1), 1×1 or
    other} for the nodes of ``graph`` (onnxruntime's optimised graph)."""
    weights = {i.name: list(i.dims) for i in graph.initializer}
    kinds = {}
    for node in graph.node:
        kind = node.op_type
        if "Conv" in kind:
            weight = weights.get(node.input[INTEGER_WEIGHT_INPUT.get(kind, 1)], [])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:
                kind += " depthwise"
            elif len(weight) == 4:
                kind += " 1×1" if weight[2] * weight[3] == 1 else " other"
        kinds[node.name] = kind
    return kinds


def profile(path: Path, image: np.ndarray, runs: int, warmup: int) -> dict[str, float]:
    """{op kind: mean µs per inference} over ``runs`` timed runs after ``warmup`` in
    onnxruntime's profiler (1 thread), and ``"(all nodes)"`` / ``"(whole run)"``: the nodes' sum
    and the mean wall time of a run."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = onnx_session_options(threads=1)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, {"images": image})
        events = json.loads(Path(session.end_profiling()).read_text())
        kinds = conv_kinds(onnx.load(options.optimized_model_filepath).graph)
    times: dict[str, list[float]] = defaultdict(list)
    whole = []
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["name"].removesuffix("_kernel_time")].append(event["dur"])
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            whole.append(event["dur"])
    by_kind: dict[str, float] = defaultdict(float)
    for node, durations in times.items():
        by_kind[kinds.get(node, node)] += float(np.mean(durations[warmup:]))
    by_kind["(all nodes)"] = sum(by_kind.values())
    by_kind["(whole run)"] = float(np.mean(whole[warmup:]))
    return dict(by_kind)


def kernel_times(path: Path, image: np.ndarray) -> dict[str, float]:
    """{plan kind: µs its kernels take per inference} in ``path`` (see :func:`profile`)."""
    out: dict[str, float] = defaultdict(float)
    for kind, us in profile(path, image, runs=100, warmup=10).items():
        kind = kind.removeprefix("Fused").removeprefix("QLinear").removeprefix("Q")
        if kind in PLAN_KIND:
            out[PLAN_KIND[kind]] += us
    return dict(out)


def kinds(plan: PrecisionPlan) -> dict[str, list[str]]:
    """{kind: its int8 layers}, in the order the kinds first appear in the student."""
    out: dict[str, list[str]] = {}
    for layer in plan.layers:
        if layer.int8:
            out.setdefault(layer.kind or "+".join(layer.ops), []).append(layer.layer)
    return out


def choose(
    model: EmbeddingModel,
    target: Target,
    calibration: torch.Tensor,
    weight_bits: int | None = None,
    keep_float: dict[str, str] | None = None,
    margin: float = 0.03,
    iterations: int = 1000,
) -> SpeedPlan:
    """The float layers that make ``model``'s int8 file for ``target`` (an onnxruntime one)
    fastest, kind by kind (see the module); ``calibration`` is a normalised batch (PTQ scales
    for the trial files)."""
    if target.runtime != "onnxruntime":
        raise ValueError(f"speed plans time onnxruntime files, not {target.runtime}'s")

    image = calibration[:1].numpy()

    def runner(folder: Path, source: torch.nn.Module, int8: bool) -> tuple[partial, Path]:
        folder.mkdir(parents=True)  # the target's file at batch 1 (an export 1.6× faster)
        path = write_onnx(source, calibration[:1], folder / target.model_file, int8, dynamic=False)
        with quiet_native_logs():
            return partial(open_runtime(path, 1).run, image), path

    def int8_file(folder: Path, keep: dict[str, str]) -> tuple[partial, Path, PrecisionPlan]:
        quant = prepare(model, target.name, calibration, False, weight_bits, keep)
        quant.calibrate([calibration])
        return *runner(folder, convert(quant), True), quant.plan

    def p50(runners: dict[str, partial]) -> dict[str, float]:
        timed = interleaved_latency(runners, warmup=20, iterations=iterations)
        return {name: latency.p50_ms for name, latency in timed.items()}

    keep = dict(keep_float or {})
    trials = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        fp32, fp32_path = runner(Path(tmp) / "fp32", model, False)
        current, int8_path, plan = int8_file(Path(tmp) / "int8", keep)
        slower = kernel_times(int8_path, image)
        fp32_us = kernel_times(fp32_path, image)
        candidates = [
            (kind, layers)
            for kind, layers in kinds(plan).items()
            if kind in WEIGHTED and slower.get(kind, 0.0) > fp32_us.get(kind, 0.0)
        ]
        floats = sum(float_compute(onnxruntime_ops(int8_path)).values())
        for i, (kind, layers) in enumerate(candidates):
            why = f"faster in float on this CPU ({kind} layers, measured on the whole file)"
            trial_keep = keep | dict.fromkeys(layers, why)
            trial, trial_path, _ = int8_file(Path(tmp) / f"trial-{i}", trial_keep)
            record = {"kind": kind, "layers": len(layers),
                      "kernels_us": [slower[kind], fp32_us.get(kind, 0.0)]}  # fmt: skip
            trial_floats = sum(float_compute(onnxruntime_ops(trial_path)).values())
            if trial_floats == floats:  # each between a DQ and a Q: quantized back by the runtime
                trials.append(record | {"requantized_by_runtime": True, "kept_float": False})
                continue
            ms = p50({"current": current, "trial": trial})
            kept = ms["trial"] < ms["current"] * (1 - margin)
            trials.append(record | {"int8_ms": ms["current"], "float_ms": ms["trial"],
                                    "kept_float": kept})  # fmt: skip
            if kept:
                keep, current, floats = trial_keep, trial, trial_floats
        final = p50({"fp32": fp32, "int8": current})
    if final["fp32"] < final["int8"] * (1 - margin):  # no int8 layer pays for its Q/DQ here
        why = "faster in float on this CPU (the whole file in float, measured)"
        keep = {layer.layer: why for layer in plan.layers if layer.int8} | keep
        final["int8"] = final["fp32"]
    return SpeedPlan(keep, trials, final["fp32"], final["int8"])
