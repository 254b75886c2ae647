"""The device check of a bundle, shared by the commands: verify it, run its whole test set in
the runtime, top-1 and pc_* against the teacher, batch-1 latency per thread count, the report."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgepc_device.bundle import BundleError, load_testset, read_bundle
from edgepc_device.metrics import evaluate
from edgepc_device.report import device_info, make_report, write_report
from edgepc_device.runtimes import MissingRuntimeError, Runtime, open_runtime
from edgepc_device.timing import latency


def fail(message: str, code: int = 2) -> int:
    """One line on stderr; the exit code for ``sys.exit``."""
    print(f"error: {message}", file=sys.stderr)
    return code


def arguments(description: str, threads: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("bundle", type=Path, help="the bundle folder (model, manifest, test set)")
    parser.add_argument("--out", type=Path, help="report path (report-<bundle>-<host>.json)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (20)")
    parser.add_argument("--iterations", type=int, default=300, help="timed calls (300)")
    if threads:
        parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                            help="thread counts to time (1 2)")  # fmt: skip
    return parser


def accuracy(
    testset: tuple[np.ndarray, np.ndarray, np.ndarray], runtime: Runtime, wrap: Callable = iter
) -> dict:
    """top-1 of ``runtime`` on the bundle's whole test set (:func:`.bundle.load_testset`), pc_*
    on the images whose teacher embeddings the bundle carries: what the validate stage and every
    device report hold."""
    x, labels, teacher = testset
    logits, embeddings = runtime.predict(x, wrap=wrap)
    return evaluate(logits, embeddings, labels, teacher)


def report_path(out: Path | None, manifest: dict, device: dict) -> Path:
    return out or Path(f"report-{manifest['name']}-{device['name']}.json")


def validate(target: str, argv: list[str] | None) -> int:
    """The whole check of a ``target`` bundle with its runtime (:mod:`.runtimes`) on this
    device; returns the exit code."""
    args = arguments(f"Validate an edgepc {target} bundle on this device.").parse_args(argv)
    if args.iterations < 2 or args.warmup < 0 or min(args.threads) < 1:
        return fail("need --iterations >= 2, --warmup >= 0 and --threads >= 1")
    try:
        manifest = read_bundle(args.bundle, target)
        model = args.bundle / manifest["model"]
        runtime = open_runtime(model, max(args.threads))
    except (BundleError, MissingRuntimeError) as error:
        return fail(str(error))
    testset = load_testset(args.bundle, manifest)
    scores = accuracy(testset, runtime)
    x = testset[0][:1]
    timings = {}
    for count in args.threads:
        one = open_runtime(model, count).run
        timings[f"{count}t"] = latency(lambda one=one: one(x), args.warmup, args.iterations)
    device = device_info(runtime.name)
    out = write_report(report_path(args.out, manifest, device),
                       make_report(args.bundle, manifest, device, scores, timings))  # fmt: skip
    fastest = min(timings.values(), key=lambda t: t["p50_ms"])
    print(
        f"{manifest['name']}: top-1 {scores['top1']:.4f}, triplet agreement "
        f"{scores['pc_triplet_agreement']:.4f}, p50 {fastest['p50_ms']:.3f} ms on "
        f"{platform.node()} -> {out}"
    )
    return 0
