"""The students people deploy, int8 on every target: torchvision's MobileNetV3, EfficientNet,
RegNetY, MobileNetV2, ResNet-18 and ShuffleNetV2 through edgepc's recipes. One run, batch 1,
interleaved turns per network.

    python benchmarks/students.py [--archs mobilenet_v3_small ...] [--sizes 96 224]
        [--threads 1 2] [--iterations 200] [--block 10] [--out benchmarks/results] [--tag NAME]

Per network and input size (3 channels, torchvision's standard stem, 10 classes, seeded
weights with batch-norm statistics away from the identity, 16 random calibration images):

- cpu: onnxruntime fp32, edgepc int8 (PTQ, the cpu recipe's 7-bit weights) with every layer
  the recipe takes, the same with the speed plan the cpu pipeline makes (the kinds of layers
  that run faster in float on this CPU kept float: :mod:`edgepc.export.speed_plan`), and the
  control a user would otherwise run, onnxruntime's ``quantize_static`` of the same fp32 file
  with 7-bit weights (``reduce_range``);
- mobile: LiteRT fp32 and edgepc int8 (PTQ), whether XNNPACK takes the int8 graph whole;
- jetson: the Q/DQ ONNX, checked against TensorRT's rules (:func:`check_onnx`), its size;
- every int8 file's precision plan: int8 layers of all layers, and which stay float.

Writes ``students[-TAG].json`` and ``.md``; the CPU is named in both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from int8_speed import ort_control
from tqdm import tqdm

from edgepc.export import speed_plan
from edgepc.export.inspect import litert_plan
from edgepc.export.runtimes import open_runtime
from edgepc.export.tensorrt import check_onnx
from edgepc.files import write_text
from edgepc.hardware import cpu_name
from edgepc.measure import interleaved_latency_by_threads
from edgepc.models import EmbeddingModel
from edgepc.models.specs import model_from_spec
from edgepc.quant import convert, prepare
from edgepc.targets import TARGETS
from edgepc_device.runtimes import quiet_native_logs, x86_without_vnni

ARCHS = ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
         "mobilenet_v2", "resnet18", "shufflenet_v2_x1_0"]  # fmt: skip
TIMED = {  # file -> the runtime that times it
    "cpu fp32": "onnxruntime",
    "cpu int8": "onnxruntime",
    "cpu int8 planned": "onnxruntime",
    "cpu ort quantize_static": "onnxruntime",
    "mobile fp32": "LiteRT",
    "mobile int8": "LiteRT",
}
CALIBRATION = 16


def network(arch: str, size: int) -> tuple[EmbeddingModel, torch.Tensor]:
    """The seeded student and its calibration images."""
    torch.manual_seed(0)
    model, _ = model_from_spec(f"torchvision:{arch}", 10, 3, size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval(), torch.randn(CALIBRATION, 3, size, size)


def build(arch: str, size: int, folder: Path) -> tuple[dict[str, Path], dict]:
    """Every file of one network, and what each int8 file is made of."""
    model, images = network(arch, size)
    paths: dict[str, Path] = {}
    facts: dict = {}
    for target in ("cpu", "mobile", "jetson"):
        if target != "jetson":
            paths[f"{target} fp32"] = TARGETS[target].write(
                model, images[:2], folder / f"{target}-fp32", False
            )
        quant = prepare(model, target, images, qat=False)
        quant.calibrate([images])
        path = TARGETS[target].write(convert(quant), images[:2], folder / f"{target}-int8", True)
        paths[f"{target} int8"] = path
        plan = quant.plan
        facts[target] = {"int8_layers": len(plan.layers) - len(plan.float_layers),
                         "layers": len(plan.layers), "plan": plan.summary()}  # fmt: skip
    speed = speed_plan.choose(model, TARGETS["cpu"], images)
    quant = prepare(model, "cpu", images, qat=False, keep_float=speed.keep_float)
    quant.calibrate([images])
    folder_planned = folder / "cpu-int8-planned"
    paths["cpu int8 planned"] = TARGETS["cpu"].write(
        convert(quant), images[:2], folder_planned, True
    )
    facts["cpu planned"] = {"plan": quant.plan.summary(), "trials": speed.trials,
                            "float_by_speed": len(speed.keep_float)}  # fmt: skip
    control = folder / "ort" / "model.onnx"
    control.parent.mkdir()
    paths["cpu ort quantize_static"] = ort_control(
        paths["cpu fp32"], images.numpy(), control, TARGETS["cpu"].recipe.weight_bits
    )
    lite = litert_plan(paths["mobile int8"])
    facts["mobile"] |= {"xnnpack_whole_graph": lite.delegated_whole_graph,
                        "float_ops": len(lite.float_ops)}  # fmt: skip
    facts["jetson"] |= {"tensorrt_check": check_onnx(paths["jetson int8"])}
    facts["jetson"]["fp32_mb"] = paths["cpu fp32"].stat().st_size / 2**20  # the same ONNX
    facts["mb"] = {name: path.stat().st_size / 2**20 for name, path in paths.items()}
    return paths, facts


def time_files(paths: dict[str, Path], size: int, args: argparse.Namespace) -> dict[str, dict]:
    """p50 per file and thread count, interleaved; speed vs fp32 and vs the control."""
    image = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    runners = {}
    for name in TIMED:
        for count in args.threads:
            with quiet_native_logs():
                runtime = open_runtime(paths[name], count)
            runners[name, count] = partial(runtime.run, image)
    timed = interleaved_latency_by_threads(runners, args.warmup, args.iterations, args.block)
    rows: dict[str, dict] = {name: {} for name in TIMED}
    for (name, count), result in timed.items():
        rows[name][f"p50_ms_{count}t"] = result.p50_ms
    for count in args.threads:
        key = f"p50_ms_{count}t"
        for target in ("cpu", "mobile"):
            rows[f"{target} int8"][f"speed_vs_fp32_{count}t"] = (
                rows[f"{target} fp32"][key] / rows[f"{target} int8"][key]
            )
        for name in ("cpu int8", "cpu int8 planned"):
            rows[name][f"speed_vs_control_{count}t"] = (
                rows["cpu ort quantize_static"][key] / rows[name][key]
            )
        rows["cpu int8 planned"][f"speed_vs_fp32_{count}t"] = (
            rows["cpu fp32"][key] / rows["cpu int8 planned"][key]
        )
        rows["cpu ort quantize_static"][f"speed_vs_fp32_{count}t"] = (
            rows["cpu fp32"][key] / rows["cpu ort quantize_static"][key]
        )
    return rows


def markdown(records: list[dict], meta: dict) -> str:
    threads = meta["threads"]
    heads = ["network", "px"]
    for count in threads:
        heads += [f"ORT int8 vs fp32 {count}t", f"planned vs fp32 {count}t",
                  f"planned vs ORT's quantizer {count}t",
                  f"LiteRT int8 vs fp32 {count}t"]  # fmt: skip
    heads += ["ORT fp32 p50 ms 1t", "XNNPACK whole", "TensorRT check", "MB fp32 / cpu / mobile /"
              " jetson int8"]  # fmt: skip
    lines = [
        "# The students people deploy: edgepc int8 against fp32 and onnxruntime's quantizer",
        "",
        f"{meta['cpu']} ({'VNNI' if meta['vnni'] else 'no VNNI: onnxruntime in its exact mode'}),"
        f" batch 1, {meta['iterations']} timed runs per file and thread count in interleaved "
        f"turns of {meta['block']}; {meta['date']}. Speed = other p50 / int8 p50 (> 1: int8 "
        "faster). LiteRT speeds are this x86 host's XNNPACK, not a phone's.",
        f"Reproduce: `{meta['command']}`",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    for r in records:
        t, mb = r["timing"], r["facts"]["mb"]
        cells = [r["arch"], str(r["size"])]
        for count in threads:
            cells += [f"{t['cpu int8'][f'speed_vs_fp32_{count}t']:.2f}×",
                      f"{t['cpu int8 planned'][f'speed_vs_fp32_{count}t']:.2f}×",
                      f"{t['cpu int8 planned'][f'speed_vs_control_{count}t']:.2f}×",
                      f"{t['mobile int8'][f'speed_vs_fp32_{count}t']:.2f}×"]  # fmt: skip
        mobile = r["facts"]["mobile"]
        cells += [
            f"{t['cpu fp32']['p50_ms_1t']:.3f}",
            "yes" if mobile["xnnpack_whole_graph"] else f"no ({mobile['float_ops']} float ops)",
            "pass",
            f"{mb['cpu fp32']:.2f} / {mb['cpu int8']:.2f} / {mb['mobile int8']:.2f} / "
            f"{mb['jetson int8']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Speed plans of the cpu files (kinds kept float for speed on this CPU):", ""]
    for r in records:
        kept = [t["kind"] for t in r["facts"]["cpu planned"]["trials"] if t["kept_float"]]
        whole = r["facts"]["cpu planned"]["plan"].startswith("int8 layers: 0 ")
        lines.append(f"- {r['arch']}@{r['size']}: " + ("every layer (fp32 was faster)" if whole
                     else ", ".join(kept) or "none"))  # fmt: skip
    lines += ["", "Precision plans (int8 layers of all layers; float layers and why):", ""]
    for r in records:
        if r["size"] != records[0]["size"]:
            continue  # a plan depends on the network, not the input size
        for target in ("cpu", "mobile", "jetson"):
            lines.append(f"- {r['arch']}, {target}: {r['facts'][target]['plan']}")
    for name in ("cpu int8", "cpu int8 planned"):
        slower = [f"{r['arch']}@{r['size']} ({r['timing'][name]['speed_vs_fp32_1t']:.2f}×)"
                  for r in records if r["timing"][name]["speed_vs_fp32_1t"] < 1.0]  # fmt: skip
        lines += ["", f"onnxruntime {name.removeprefix('cpu ')} slower than fp32 at 1 thread: "
                  + (", ".join(slower) or "none")]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 224])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(args.threads))
    records = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in tqdm(args.archs, desc="students"):
            for size in args.sizes:
                paths, facts = build(arch, size, Path(tmp) / f"{arch}-{size}")
                timing = time_files(paths, size, args)
                records.append({"arch": arch, "size": size, "facts": facts, "timing": timing})
    meta = {
        "cpu": cpu_name(),
        "vnni": not x86_without_vnni(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "block": args.block,
        "iterations": args.iterations,
        "threads": args.threads,
        "command": "python benchmarks/students.py " + " ".join(argv or sys.argv[1:]),
    }
    stem = "students" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{stem}.json", json.dumps({"meta": meta, "records": records}, indent=1))
    table = markdown(records, meta)
    write_text(args.out / f"{stem}.md", table)
    print(table)
    return {"meta": meta, "records": records}


if __name__ == "__main__":
    main()
