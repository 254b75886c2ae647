"""Is edgepc's int8 faster than fp32, and as fast as the runtime's own quantizer? One run,
batch 1, interleaved turns.

    python benchmarks/int8_speed.py [--nets NAME ...] [--threads 1 2] [--block 10]
        [--iterations 200] [--warmup 20] [--out benchmarks/results] [--tag NAME]

Networks: every zoo student at the default input (1×28×28), and MobileNetV2-0.5 and
ShuffleNetV2-0.5 with torchvision's standard stride-2 stems at 3×224×224 (``NAME@224``).
Weights are seeded random with batch-norm statistics drawn away from the identity; latency
does not depend on their values (the pipeline measures the recipes' accuracy).

Files per network, written by edgepc's own writers:

- onnxruntime: fp32; edgepc int8 from the PTQ recipe and from the QAT recipe (its
  fake-quant graph converted), both with the cpu recipe's 7-bit weights, and PTQ with 8-bit
  weights; and the control a user would otherwise pick: onnxruntime's ``quant_pre_process``
  then ``quantize_static`` of the same fp32 file (QDQ, uint8 activations, int8 per-channel
  weights, the same 16 calibration images), with 8-bit weights and with 7-bit ones
  (``reduce_range``); each edgepc file is compared with the control of its weights' bits;
- LiteRT: fp32 and edgepc int8 (PTQ, QAT), full-integer.

Every file runs in every round (1 thread, then 2; ``--iterations`` timed calls per file and
thread count, in turns of ``--block`` calls), so a slow spell of the shared machine hits all of them
alike; speed is fp32 p50 / file p50. Writes ``int8_speed[-TAG].json`` and ``.md``.
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
import torchvision
from tqdm import tqdm

from edgepc.export.inspect import tflite_bytes
from edgepc.export.runtimes import open_runtime
from edgepc.files import write_text
from edgepc.hardware import cpu_name
from edgepc.measure import interleaved_latency_by_threads
from edgepc.models import MODELS, EmbeddingModel, build_model
from edgepc.quant import convert, prepare
from edgepc.quant.recipes import recipe
from edgepc.targets import TARGETS
from edgepc_device.runtimes import quiet_native_logs, x86_without_vnni

STANDARD_STEMS: dict[str, Callable[[], EmbeddingModel]] = {
    "mobilenetv2_0.5@224": lambda: EmbeddingModel(
        torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5), "features"
    ),
    "shufflenetv2_0.5@224": lambda: EmbeddingModel(
        torchvision.models.shufflenet_v2_x0_5(num_classes=10), "conv5"
    ),
}
STUDENTS = [name for name, spec in MODELS.items() if spec.role == "student"]
CALIBRATION = 16
TIMED = {"cpu": "onnxruntime", "mobile": "LiteRT"}
# edgepc's int8 files: variant -> (QAT, weight bits; None: the target recipe's)
VARIANTS = {"ptq": (False, None), "qat": (True, None), "ptq 8-bit": (False, 8)}
CONTROLS = {8: "int8 ort quantize_static", 7: "int8 ort quantize_static reduce_range"}


def network(name: str) -> tuple[EmbeddingModel, torch.Tensor]:
    """The seeded model and 16 calibration images at its input size."""
    torch.manual_seed(0)
    if name in STANDARD_STEMS:
        model, shape = STANDARD_STEMS[name](), (3, 224, 224)
    else:
        model, shape = build_model(name, 10, 1), (1, 28, 28)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval(), torch.randn(CALIBRATION, *shape)


def ort_control(fp32: Path, images: np.ndarray, path: Path, bits: int) -> Path:
    """onnxruntime's own static quantization of ``fp32`` (``bits``-bit weights: 7 is its
    ``reduce_range``): what a user would otherwise run."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": image[None]} for image in images])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=bits == 7, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)  # fmt: skip
    pre.unlink()
    return path


def files(name: str, folder: Path) -> dict[tuple[str, str], tuple[Path, int | None]]:
    """{(target, variant): (model file, its weights' bits; None for fp32)} for one network."""
    model, images = network(name)
    out: dict[tuple[str, str], tuple[Path, int | None]] = {}
    for target in TIMED:
        sub = folder / target
        out[target, "fp32"] = TARGETS[target].write(model, images[:2], sub / "fp32", False), None
        for variant, (qat, bits) in VARIANTS.items():
            own = recipe(target).weight_bits
            if bits == own:  # the recipe's own bits: the plain variant already
                continue
            quant = prepare(model, target, images, qat=qat, weight_bits=bits)
            quant.calibrate([images])
            (sub / variant).mkdir(parents=True, exist_ok=True)
            path = TARGETS[target].write(convert(quant), images[:2], sub / variant, True)
            out[target, f"int8 {variant}"] = path, bits or own
    fp32 = out["cpu", "fp32"][0]
    for bits, variant in CONTROLS.items():
        (folder / f"ort{bits}").mkdir()
        path = ort_control(fp32, images.numpy(), folder / f"ort{bits}" / "model.onnx", bits)
        out["cpu", variant] = path, bits
    return out


def measure(
    built: dict[str, dict[tuple[str, str], tuple[Path, int | None]]],
    threads: list[int],
    block: int,
    warmup: int,
    iterations: int,
) -> list[dict]:
    rows: dict[tuple[str, str, str], dict] = {}
    runners = {}
    for net, paths in built.items():
        shape = network_shape(net)
        image = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
        for (target, variant), (path, bits) in paths.items():
            rows[net, target, variant] = {
                "net": net,
                "input": "×".join(map(str, shape)),
                "runtime": TIMED[target],
                "variant": variant,
                "weight_bits": bits,
                "size_mb": path.stat().st_size / 2**20,
            }
            if path.suffix == ".tflite":
                rows[net, target, variant]["bytes"] = tflite_bytes(path)
            for count in threads:
                with quiet_native_logs():
                    runtime = open_runtime(path, count)
                runners[net, target, variant, count] = partial(runtime.run, image)
    timed = interleaved_latency_by_threads(runners, warmup, iterations, block)
    for (net, target, variant, count), result in timed.items():
        rows[net, target, variant] |= {
            f"p50_ms_{count}t": result.p50_ms,
            f"p90_ms_{count}t": result.p90_ms,
            f"iterations_{count}t": result.iterations,
        }
    for (net, target, _), row in rows.items():
        fp32 = rows[net, target, "fp32"]
        control = rows.get((net, target, CONTROLS.get(row["weight_bits"], "")))
        row["fp32_size_ratio"] = fp32["size_mb"] / row["size_mb"]
        for count in threads:
            key = f"p50_ms_{count}t"
            row[f"speed_vs_fp32_{count}t"] = fp32[key] / row[key]
            if control is not None and row["variant"] != "fp32":
                row[f"speed_vs_control_{count}t"] = control[key] / row[key]
    return list(rows.values())


def network_shape(name: str) -> tuple[int, int, int]:
    return (3, 224, 224) if name in STANDARD_STEMS else (1, 28, 28)


def markdown(rows: list[dict], threads: list[int], meta: dict) -> str:
    heads = ["network", "input", "runtime", "file", "weight bits", "MB", "× smaller"]
    for count in threads:
        heads += [f"p50 ms {count}t", f"speed vs fp32 {count}t"]
    heads.append("speed vs ORT quantize_static of the same bits, 1t")
    vnni = (
        "VNNI: onnxruntime's fast uint8 × int8 kernels"
        if meta.get("vnni", True)
        else "no VNNI: onnxruntime in its exact mode, 8-bit weights on its uint8 × uint8 kernels "
        "(its fast ones saturate here), 7-bit weights on its fast uint8 × int8 ones"
    )
    lines = [
        "# int8 speed: edgepc's recipes against fp32 and onnxruntime's quantize_static",
        "",
        f"{meta['cpu']} ({vnni}), batch 1, {meta['iterations']} timed runs per file and thread "
        "count in "
        f"interleaved turns of {meta['block']}; {meta['date']}. Speed = fp32 p50 / file p50 "
        "(> 1: faster than fp32).",
        f"Reproduce: `{meta['command']}`",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    for row in rows:
        cells = [row["net"], row["input"], row["runtime"], row["variant"],
                 str(row["weight_bits"] or ""), f"{row['size_mb']:.3f}",
                 f"{row['fp32_size_ratio']:.2f}"]  # fmt: skip
        for count in threads:
            key = f"{count}t"
            cells += [f"{row[f'p50_ms_{key}']:.3f}", f"{row[f'speed_vs_fp32_{key}']:.2f}×"]
        control = row.get("speed_vs_control_1t")
        cells.append("" if control is None else f"{control:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    slower = [r for r in rows if r["variant"] != "fp32" and r["speed_vs_fp32_1t"] < 1.0]
    lines += ["", "int8 slower than fp32 at 1 thread: " + (
        ", ".join(f"{r['net']} {r['runtime']} {r['variant']} ({r['speed_vs_fp32_1t']:.2f}×)"
                  for r in slower) or "none")]  # fmt: skip
    lines += ["", *size_table(rows)]
    return "\n".join(lines) + "\n"


def size_table(rows: list[dict]) -> list[str]:
    """Where the bytes of each LiteRT file go (kB): the fixed cost of per-channel quantization
    (a float32 scale and an int64 zero point per channel, weights and biases) is what keeps int8
    files from being a quarter of fp32 ones."""
    kinds = ["float32", "int8", "int32", "quantization", "names", "other"]
    lines = [
        "Where the bytes of each LiteRT file go (kB; `quantization`: a float32 scale and an "
        "int64 zero point per channel of every weight and bias):",
        "",
        "| network | file | " + " | ".join(kinds) + " | × smaller |",
        "|" + "---|" * (len(kinds) + 3),
    ]
    for row in rows:
        if "bytes" in row:
            cells = [f"{row['bytes'].get(k, 0) / 1000:.1f}" for k in kinds]
            lines.append(f"| {row['net']} | {row['variant']} | " + " | ".join(cells)
                         + f" | {row['fp32_size_ratio']:.2f} |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=[*STUDENTS, *STANDARD_STEMS],
                        choices=[*STUDENTS, *STANDARD_STEMS])  # fmt: skip
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--block", type=int, default=10, help="calls per interleaved turn")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(args.threads))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = {}
        for net in tqdm(args.nets, desc="export"):
            built[net] = files(net, Path(tmp) / net)
        rows = measure(built, args.threads, args.block, args.warmup, args.iterations)
    meta = {
        "cpu": cpu_name(),
        "vnni": not x86_without_vnni(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "block": args.block,
        "iterations": args.iterations,
        "threads": args.threads,
        "command": "python benchmarks/int8_speed.py " + " ".join(argv or sys.argv[1:]),
    }
    stem = "int8_speed" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, args.threads, meta)
    write_text(args.out / f"{stem}.md", table)
    print(table)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
