"""Batch-1 latency and size of exported bundles in their runtimes: int8 against fp32, as ratios
measured in one run.

    python benchmarks/runtime_latency.py EXPORT_DIR [EXPORT_DIR ...] [--threads 1 2]
        [--block 10] [--iterations 1500] [--warmup 30] [--out benchmarks/results] [--tag NAME]

EXPORT_DIR is an export stage's folder (the pipeline's summary prints it: ``bundles: DIR/...``),
or one bundle. Every bundle is timed with the validate stage's timer (:func:`edgepc.measure.
interleaved_latency`): ``iterations`` calls each, in interleaved turns of ``block`` calls
(fp32, int8, fp32, int8, ...) so that a slow spell of a shared machine hits both; percentiles
are over all calls, and the speed-up is fp32 p50 / int8 p50 of the same target and thread
count. Writes ``runtime_latency-TAG.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from edgepc.export.bundle import MANIFEST, read_manifest
from edgepc.files import write_text
from edgepc.hardware import cpu_name
from edgepc.pipelines.config import LatencySection
from edgepc.pipelines.deploy import time_bundles


def bundles(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        inside = sorted(p.parent for p in path.glob(f"*/{MANIFEST}"))
        found += [path] if (path / MANIFEST).is_file() else inside
    if not found:
        raise SystemExit(f"error: no bundle (a folder with {MANIFEST}) in {paths}")
    return found


def measure(
    folders: list[Path], threads: list[int], block: int, warmup: int, iterations: int
) -> dict[str, dict]:
    """{bundle: {"size_mb", "target", "precision", "p50_ms_Nt", "p99_ms_Nt", ...}}: the validate
    stage's timer."""
    section = LatencySection(warmup=warmup, iterations=iterations, threads=threads, block=block)
    timed = time_bundles(folders, section)
    results: dict[str, dict] = {}
    for folder in folders:
        manifest = read_manifest(folder)
        results[manifest.name] = {
            "target": manifest.target,
            "precision": manifest.precision,
            "source": manifest.source,
            "runtime": manifest.runtime,
            "size_mb": manifest.entry(manifest.model).bytes / 2**20,
        } | timed[manifest.name]
    return results


def ratios(results: dict[str, dict], threads: list[int]) -> list[dict]:
    """fp32 / int8 for every int8 bundle with an fp32 bundle of the same target."""
    rows = []
    for name, row in results.items():
        if row["precision"] != "int8":
            continue
        fp32 = next((r for r in results.values() if r["target"] == row["target"]
                     and r["precision"] == "fp32"), None)  # fmt: skip
        if fp32 is None:
            continue
        entry = {"int8": name, "size_ratio": fp32["size_mb"] / row["size_mb"]}
        for count in threads:
            entry[f"speedup_{count}t"] = fp32[f"p50_ms_{count}t"] / row[f"p50_ms_{count}t"]
        rows.append(entry)
    return rows


def markdown(report: dict) -> str:
    threads = report["threads"]
    lines = [
        "# Batch-1 latency of exported bundles in their runtimes",
        "",
        f"{report['when']} · {report['machine']} · {report['iterations']} timed calls in "
        f"interleaved turns of {report['block']} (warm-up {report['warmup']}) · "
        f"`{report['command']}`",
        "",
        "| bundle | runtime | MB | "
        + " | ".join(f"p50 / p99 ms ({t} thr)" for t in threads)
        + " |",
        "|---|---|---|" + "---|" * len(threads),
    ]
    for name, row in report["results"].items():
        times = " | ".join(f"{row[f'p50_ms_{t}t']:.3f} / {row[f'p99_ms_{t}t']:.3f}"
                           for t in threads)  # fmt: skip
        lines.append(f"| {name} | {row['runtime']} | {row['size_mb']:.3f} | {times} |")
    lines += [
        "",
        "| int8 bundle | fp32 / int8 size | "
        + " | ".join(f"fp32 / int8 p50 ({t} thr)" for t in threads)
        + " |",
        "|---|---|" + "---|" * len(threads),
    ]
    for row in report["ratios"]:
        speed = " | ".join(f"{row[f'speedup_{t}t']:.2f}×" for t in threads)
        lines.append(f"| {row['int8']} | {row['size_ratio']:.2f}× | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="export stage folders or bundles")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--block", type=int, default=10, help="calls per interleaved turn")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="local", help="name of the result files")
    args = parser.parse_args(argv)
    results = measure(bundles(args.paths), args.threads, args.block, args.warmup,
                      args.iterations)  # fmt: skip
    report = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_name(),
        "command": "python benchmarks/runtime_latency.py " + " ".join(argv),
        "threads": args.threads,
        "block": args.block,
        "warmup": args.warmup,
        "iterations": args.iterations,
        "results": results,
        "ratios": ratios(results, args.threads),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"runtime_latency-{args.tag}"
    write_text(stem.with_suffix(".json"), json.dumps(report, indent=2))
    write_text(stem.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
