"""Where one batch-1 inference spends its time: fp32 against edgepc's int8, op by op in
onnxruntime's own profiler, and layer by layer in onnxruntime and LiteRT. It explains the ratios
of ``int8_speed.py``.

    python benchmarks/int8_profile.py [--nets NAME ...] [--runs 300] [--warmup 30]
        [--layers NAME ...] [--layer-iterations 1000]
        [--out benchmarks/results] [--tag NAME]

Files per network (the networks and seeded weights of ``int8_speed.py``): fp32, edgepc int8
with the cpu recipe's 7-bit weights, and with 8-bit weights; each opened as the validate stage
opens it (1 thread; onnxruntime's exact int8 mode on x86 CPUs without VNNI). Each node's time
is its mean over the timed runs; nodes are grouped by op and, for convolutions, by kind
(depthwise, 1×1, other), since int8 kernels win or lose by kind.

LiteRT has no per-op profiler in its Python package, so the kinds are also timed one at a time,
at the 56-px stage of MobileNetV2-0.5 at 224 px (16 channels, expanded 6×): a layer's cost is the
time of a stack of 5 layers minus that of 1, over 4, so what every file pays once (quantizing
the input, the pooled head) cancels; fp32 against edgepc's int8 of the target's recipe (PTQ), in
both runtimes, 1 thread, interleaved turns (``int8_speed``'s timer).
Writes ``int8_profile[-TAG].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from int8_speed import STANDARD_STEMS, STUDENTS, TIMED, network, network_shape
from torch import nn
from tqdm import tqdm

from edgepc.export.runtimes import open_runtime
from edgepc.export.speed_plan import profile
from edgepc.files import write_text
from edgepc.hardware import cpu_name
from edgepc.measure import interleaved_latency
from edgepc.models import EmbeddingModel
from edgepc.quant import convert, prepare
from edgepc.targets import TARGETS
from edgepc_device.runtimes import quiet_native_logs, x86_without_vnni

FILES = {"fp32": None, "int8 7-bit": 7, "int8 8-bit": 8}
# Layers of the 56-px stage of MobileNetV2-0.5 at 224 px, each keeping its input's shape so
# that it stacks: name -> (what it is, its channels, a factory of one layer with batch norm).
LAYERS: dict[str, tuple[str, int, Callable[[], nn.Module]]] = {
    "pointwise": ("1×1 expand 16→96 + 1×1 project 96→16", 16, lambda: nn.Sequential(
        nn.Conv2d(16, 96, 1), nn.BatchNorm2d(96), nn.ReLU6(), nn.Conv2d(96, 16, 1),
        nn.BatchNorm2d(16))),
    "depthwise": ("3×3 depthwise, 96 channels", 96, lambda: nn.Sequential(
        nn.Conv2d(96, 96, 3, padding=1, groups=96), nn.BatchNorm2d(96), nn.ReLU6())),
    "conv3x3": ("3×3 conv 16→16", 16, lambda: nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())),
}  # fmt: skip
LAYER_SIZE, DEPTHS = 56, (1, 5)


def files(name: str, folder: Path) -> dict[str, Path]:
    model, images = network(name)
    out = {"fp32": TARGETS["cpu"].write(model, images[:2], folder / "fp32", False)}
    for label, bits in FILES.items():
        if bits is None:
            continue
        quant = prepare(model, "cpu", images, qat=False, weight_bits=bits)
        quant.calibrate([images])
        (folder / label).mkdir(parents=True)
        out[label] = TARGETS["cpu"].write(convert(quant), images[:2], folder / label, True)
    return out


def stack(name: str, depth: int) -> tuple[EmbeddingModel, torch.Tensor]:
    """``depth`` seeded layers ``name`` with a pooled linear head, and 16 images."""
    _, channels, make = LAYERS[name]
    torch.manual_seed(0)
    net = nn.Sequential(*[make() for _ in range(depth)])
    net.append(nn.AdaptiveAvgPool2d(1)).append(nn.Flatten()).append(nn.Linear(channels, 10))
    return EmbeddingModel(net, str(depth)).eval(), torch.randn(16, channels, LAYER_SIZE, LAYER_SIZE)


def layer_speed(names: list[str], folder: Path, warmup: int, iterations: int) -> list[dict]:
    """[{layer, runtime, fp32_ms, int8_ms, speed}]: the ms one layer adds at 1 thread (p50 of 5
    stacked minus p50 of 1, over 4) in its fp32 and int8 file (the target recipe, PTQ); the
    eight files of a layer interleaved."""
    rows = []
    for name in tqdm(names, desc="layers"):
        runners = {}
        for depth in DEPTHS:
            model, images = stack(name, depth)
            for target, runtime in TIMED.items():
                quant = prepare(model, target, images)
                quant.calibrate([images])
                for label, source in (("fp32", model), ("int8", convert(quant))):
                    out = folder / name / str(depth) / target / label
                    out.mkdir(parents=True)
                    path = TARGETS[target].write(source, images[:2], out, label == "int8")
                    with quiet_native_logs():
                        run = partial(open_runtime(path, 1).run, images[:1].numpy())
                    runners[runtime, label, depth] = run
        timed = interleaved_latency(runners, warmup, iterations)
        for runtime in TIMED.values():
            cost = {label: (timed[runtime, label, DEPTHS[1]].p50_ms
                            - timed[runtime, label, DEPTHS[0]].p50_ms) / (DEPTHS[1] - DEPTHS[0])
                    for label in ("fp32", "int8")}  # fmt: skip
            rows.append({"layer": LAYERS[name][0], "runtime": runtime, "fp32_ms": cost["fp32"],
                         "int8_ms": cost["int8"],
                         "speed": cost["fp32"] / cost["int8"]})  # fmt: skip
    return rows


def markdown(
    results: dict[str, dict[str, dict[str, float]]], layers: list[dict], meta: dict
) -> str:
    mode = "exact int8 mode (no VNNI)" if not meta["vnni"] else "VNNI"
    lines = [
        "# Where batch-1 inference spends its time in onnxruntime: fp32 vs edgepc int8",
        "",
        f"{meta['cpu']}, onnxruntime {meta['onnxruntime']} ({mode}), 1 thread, mean µs per "
        f"inference over {meta['runs']} runs; {meta['date']}. Reproduce: `{meta['command']}`",
    ]
    for net, by_file in results.items():
        kinds = sorted({k for row in by_file.values() for k in row if not k.startswith("(")},
                       key=lambda k: -max(row.get(k, 0.0) for row in by_file.values()))  # fmt: skip
        labels = list(by_file)
        lines += ["", f"## {net}, input {'×'.join(map(str, network_shape(net)))}", "",
                  "| op | " + " | ".join(f"{label} µs" for label in labels) + " |",
                  "|" + "---|" * (len(labels) + 1)]  # fmt: skip
        for kind in [*kinds, "(all nodes)", "(whole run)"]:
            cells = [f"{by_file[label].get(kind, 0.0):.1f}" for label in labels]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", f"## One layer at {LAYER_SIZE} px, fp32 against int8 (PTQ, the target's recipe), "
              "1 thread: ms it adds (p50 of 5 stacked − p50 of 1, over 4)",
              "", "| layer | runtime | fp32 ms | int8 ms | int8 speed vs fp32 |",
              "|---|---|---|---|---|"]  # fmt: skip
    for row in layers:
        lines.append(f"| {row['layer']} | {row['runtime']} | {row['fp32_ms']:.3f} | "
                     f"{row['int8_ms']:.3f} | {row['speed']:.2f}× |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=["mobilenetv2_0.5", "mobilenetv2_0.5@224"],
                        choices=[*STUDENTS, *STANDARD_STEMS])  # fmt: skip
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--layer-iterations", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for net in tqdm(args.nets, desc="profile"):
            image = np.random.default_rng(0).standard_normal((1, *network_shape(net)), np.float32)
            paths = files(net, Path(tmp) / net)
            results[net] = {k: profile(p, image, args.runs, args.warmup) for k, p in paths.items()}
        layers = layer_speed(args.layers, Path(tmp) / "layers", args.warmup, args.layer_iterations)
    meta = {
        "cpu": cpu_name(),
        "vnni": not x86_without_vnni(),
        "onnxruntime": onnxruntime.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "runs": args.runs,
        "command": "python benchmarks/int8_profile.py " + " ".join(argv or sys.argv[1:]),
    }
    stem = "int8_profile" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "results": results, "layers": layers}
    write_text(args.out / f"{stem}.json", json.dumps(report, indent=1))
    table = markdown(results, layers, meta)
    write_text(args.out / f"{stem}.md", table)
    print(table)
    return report


if __name__ == "__main__":
    main()
