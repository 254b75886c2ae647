"""Where one batch-1 inference spends its time in onnxruntime: fp32 against edgepc's int8, op
by op, from onnxruntime's own profiler. It explains the ratios of ``int8_speed.py``.

    python benchmarks/int8_profile.py [--nets NAME ...] [--runs 300] [--warmup 30]
        [--out benchmarks/results] [--tag NAME]

Files per network (the networks and seeded weights of ``int8_speed.py``): fp32, edgepc int8
with the cpu recipe's 7-bit weights, and with 8-bit weights; each opened as the validate stage
opens it (1 thread; onnxruntime's exact int8 mode on x86 CPUs without VNNI). Each node's time
is its mean over the timed runs; nodes are grouped by op and, for convolutions, by kind
(depthwise, 1×1, other), since int8 kernels win or lose by kind. Writes
``int8_profile[-TAG].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from int8_speed import STANDARD_STEMS, STUDENTS, network, network_shape
from tqdm import tqdm

from edgepc.export.bundle import WRITERS
from edgepc.export.inspect import INTEGER_WEIGHT_INPUT
from edgepc.export.runtimes import onnx_session_options, x86_without_vnni
from edgepc.files import write_text
from edgepc.hardware import cpu_name
from edgepc.quant import convert, prepare

if TYPE_CHECKING:
    import onnx

FILES = {"fp32": None, "int8 7-bit": 7, "int8 8-bit": 8}


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
    """{op kind: mean µs per inference} over ``runs`` timed runs after ``warmup``, and
    ``"(all nodes)"`` / ``"(whole run)"``: the nodes' sum and the mean wall time of a run."""
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


def files(name: str, folder: Path) -> dict[str, Path]:
    model, images = network(name)
    out = {"fp32": WRITERS["cpu"](model, images[:2], folder / "fp32", False)}
    for label, bits in FILES.items():
        if bits is None:
            continue
        quant = prepare(model, "cpu", images, qat=False, weight_bits=bits)
        quant.calibrate([images])
        (folder / label).mkdir(parents=True)
        out[label] = WRITERS["cpu"](convert(quant), images[:2], folder / label, True)
    return out


def markdown(results: dict[str, dict[str, dict[str, float]]], meta: dict) -> str:
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=["mobilenetv2_0.5", "mobilenetv2_0.5@224"],
                        choices=[*STUDENTS, *STANDARD_STEMS])  # fmt: skip
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
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
    write_text(args.out / f"{stem}.json", json.dumps({"meta": meta, "results": results}, indent=1))
    table = markdown(results, meta)
    write_text(args.out / f"{stem}.md", table)
    print(table)
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
