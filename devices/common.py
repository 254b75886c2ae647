"""What every on-device script shares: reading and verifying a bundle, the input pipeline, the
pc_* metrics in numpy, the latency timer, device facts and the report.

Needs Python 3.8+ and numpy only (no torch, no edgepc): copy the ``devices`` folder and a
bundle to the device. The numbers follow edgepc's own definitions (``edgepc.coherence`` and
``edgepc.measure``), so a report compares one to one with the pipeline's validate stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPORT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(Exception):
    """The bundle is missing, malformed, or does not match its manifest."""


def fail(message: str, code: int = 2) -> int:
    """One line on stderr; the exit code for ``sys.exit``."""
    print(f"error: {message}", file=sys.stderr)
    return code


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bundle(folder: Path, target: str) -> dict:
    """The manifest of ``folder``, after checking that it is a ``target`` bundle and that every
    file it lists is there with its recorded size and sha256 (a tampered or partly copied
    bundle is refused)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(f"{folder} has no {MANIFEST}: give the bundle folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{folder / MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != 1:
        raise BundleError(f"{folder / MANIFEST} is not an edgepc bundle manifest (version 1)")
    if manifest.get("target") != target:
        raise BundleError(
            f"{folder} is a {manifest.get('target')!r} bundle; this script runs {target!r} ones"
        )
    names = [entry.get("path", "") for entry in manifest.get("files", [])]
    for needed in (manifest.get("model"), manifest.get("testset")):
        if needed not in names:
            raise BundleError(f"{MANIFEST} lists no file {needed!r}")
    for entry in manifest["files"]:
        name = entry["path"]
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise BundleError(f"{MANIFEST} names {name!r}, not a plain file of the bundle")
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle {folder} is missing {name}")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise BundleError(
                f"{path} does not match its sha256 in {MANIFEST}: the bundle was changed or "
                "copied incompletely; copy it again"
            )
    return manifest


def load_testset(folder: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised float32 images (N, C, H, W), labels, and the teacher's embeddings."""
    with np.load(folder / manifest["testset"]) as test:
        images, labels, teacher = test["images"], test["labels"], test["teacher_embeddings"]
    norm = manifest["normalisation"]
    mean = np.asarray(norm["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(norm["std"], np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std, labels, teacher


# --- pc_* metrics (edgepc.coherence.metrics, in numpy) -------------------------------------


def _distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances between all rows, float64, from inner products."""
    x = x.astype(np.float64)
    sq = (x * x).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0, None)
    return np.sqrt(d2)


def _drop_self(d: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    n = d.shape[1]
    keep = np.ones_like(d, dtype=bool)
    keep[np.arange(len(anchors)), anchors] = False
    return d[keep].reshape(len(anchors), n - 1)


def _run_starts(new_run: np.ndarray) -> np.ndarray:
    position = np.broadcast_to(np.arange(new_run.shape[1]), new_run.shape)
    return np.maximum.accumulate(np.where(new_run, position, 0), axis=1)


def _run_start_mask(*keys: np.ndarray) -> np.ndarray:
    new_run = np.zeros(keys[0].shape, dtype=bool)
    new_run[:, 0] = True
    for key in keys:
        new_run[:, 1:] |= key[:, 1:] != key[:, :-1]
    return new_run


def _midranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks per row, ties sharing the mean of their ranks."""
    n = x.shape[1]
    order = np.argsort(x, axis=1, kind="stable")
    new_run = _run_start_mask(np.take_along_axis(x, order, 1))
    first = _run_starts(new_run)
    run_end = np.ones_like(new_run)
    run_end[:, :-1] = new_run[:, 1:]
    last = n - 1 - _run_starts(run_end[:, ::-1])[:, ::-1]
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0, 1)
    return ranks


def _count_inversions(x: np.ndarray) -> np.ndarray:
    """Per row of non-negative integers, pairs p < q with x[p] > x[q]: a merge sort run on all
    rows at once (each merge is one searchsorted over segments offset to disjoint ranges)."""
    rows, n = x.shape
    size = 1 << max(0, (n - 1).bit_length())
    top = int(x.max()) + 1 if x.size else 1
    run = np.concatenate([x, np.full((rows, size - n), top, dtype=np.int64)], axis=1)
    inversions = np.zeros(rows, dtype=np.int64)
    width = 1
    while width < size:
        segments = size // (2 * width)
        pairs = run.reshape(rows, segments, 2, width)
        left, right = pairs[:, :, 0], pairs[:, :, 1]
        offset = (np.arange(rows * segments, dtype=np.int64) * (top + 1)).reshape(rows, segments, 1)
        base = (np.arange(rows * segments, dtype=np.int64) * width).reshape(rows, segments, 1)
        flat_left, flat_right = (left + offset).ravel(), (right + offset).ravel()
        left_upto_right = np.searchsorted(flat_left, flat_right, "right").reshape(
            right.shape) - base  # fmt: skip
        right_below_left = np.searchsorted(flat_right, flat_left, "left").reshape(
            left.shape) - base  # fmt: skip
        inversions += (width - left_upto_right).sum((1, 2))
        positions = np.arange(width)
        merged = np.empty((rows, segments, 2 * width), dtype=np.int64)
        np.put_along_axis(merged, positions + right_below_left, left, 2)
        np.put_along_axis(merged, positions + left_upto_right, right, 2)
        run = merged.reshape(rows, size)
        width *= 2
    return inversions


def _tied_pairs(new_run: np.ndarray) -> np.ndarray:
    position = np.broadcast_to(np.arange(new_run.shape[1]), new_run.shape)
    return (position - _run_starts(new_run)).sum(1)


def _agreeing_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, pairs with sign(a_j - a_k) = sign(b_j - b_k), ties included (Knight)."""
    by_b = np.argsort(b, axis=1, kind="stable")
    order = np.take_along_axis(
        by_b, np.argsort(np.take_along_axis(a, by_b, 1), axis=1, kind="stable"), 1
    )
    a_sorted, b_sorted = np.take_along_axis(a, order, 1), np.take_along_axis(b, order, 1)
    discordant = _count_inversions(b_sorted)
    tied_a = _tied_pairs(_run_start_mask(a_sorted))
    tied_b = _tied_pairs(_run_start_mask(np.take_along_axis(b, by_b, 1)))
    tied_both = _tied_pairs(_run_start_mask(a_sorted, b_sorted))
    n = a.shape[1]
    return n * (n - 1) // 2 - discordant - tied_a - tied_b + 2 * tied_both


def coherence_metrics(student: np.ndarray, teacher: np.ndarray, block: int = 256) -> dict:
    """pc_rank_gap, pc_triplet_agreement, pc_spearman of student vs teacher embeddings
    (Euclidean dissimilarities, each anchor against all others), as edgepc computes them."""
    n_total = len(student)
    s_dis, t_dis = _distances(student), _distances(teacher)
    gap_twice, agree, rhos = 0, 0, []
    for start in range(0, n_total, block):
        anchors = np.arange(start, min(start + block, n_total))
        s_rank = _midranks(_drop_self(s_dis[anchors], anchors))
        t_rank = _midranks(_drop_self(t_dis[anchors], anchors))
        s_int, t_int = (2 * s_rank).astype(np.int64), (2 * t_rank).astype(np.int64)
        gap_twice += int(np.abs(s_int - t_int).sum())
        agree += int(_agreeing_pairs(s_int, t_int).sum())
        sc = s_rank - s_rank.mean(1, keepdims=True)
        tc = t_rank - t_rank.mean(1, keepdims=True)
        norm = np.linalg.norm(sc, axis=1) * np.linalg.norm(tc, axis=1)
        defined = norm > 0
        rhos += ((sc * tc).sum(1)[defined] / norm[defined]).tolist()
    n = n_total - 1
    return {
        "pc_rank_gap": gap_twice / (2 * (n_total - 2) * n_total * n),
        "pc_triplet_agreement": agree / (n_total * (n * (n - 1) // 2)),
        "pc_spearman": math.fsum(rhos) / len(rhos) if rhos else float("nan"),
    }


# --- timing, device facts, report -----------------------------------------------------------


def latency(fn: Callable[[], object], warmup: int, iterations: int) -> dict[str, float]:
    """Per-call milliseconds after ``warmup`` untimed calls (edgepc.measure.latency's rules)."""
    if iterations < 2:
        raise ValueError(f"latency needs at least 2 timed iterations, got {iterations}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return summarise(times, warmup)


def summarise(times_ms: list[float], warmup: int) -> dict[str, float]:
    cuts = statistics.quantiles(times_ms, n=100, method="inclusive")
    mean = statistics.fmean(times_ms)
    return {
        "p50_ms": cuts[49],
        "p90_ms": cuts[89],
        "p99_ms": cuts[98],
        "mean_ms": mean,
        "std_ms": statistics.stdev(times_ms),
        "warmup": warmup,
        "iterations": len(times_ms),
        "throughput": 1000.0 / mean,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def x86_without_vnni() -> bool:
    """An x86 CPU without VNNI (or unknown flags): onnxruntime's fast uint8 × int8 kernels
    saturate there, so the cpu script asks for its exact kernels (as edgepc's validate stage)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return not {"avx512_vnni", "avx_vnni"} & set(flags)


def device_info(runtime: str, runtime_version: str, extra: dict | None = None) -> dict:
    return {
        "name": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "runtime": runtime,
        "runtime_version": runtime_version,
        **(extra or {}),
    }


def peak_rss_mb() -> float:
    """The process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def evaluate(
    logits: np.ndarray, embeddings: np.ndarray, labels: np.ndarray, teacher: np.ndarray
) -> dict:
    """top-1 on every image, pc_* on the images whose teacher embeddings the bundle carries."""
    n = len(teacher)
    result = {"top1": float((logits.argmax(1) == labels).mean()), "images": len(labels)}
    result.update(coherence_metrics(embeddings[:n], teacher))
    result["pc_images"] = n
    return result


def write_report(path: Path, report: dict) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    return path


def make_report(
    folder: Path, manifest: dict, device: dict, accuracy: dict, latency_by_threads: dict
) -> dict:
    """The report.json every device script writes (schema version ``REPORT_VERSION``)."""
    return {
        "report_version": REPORT_VERSION,
        "bundle": {
            "name": manifest["name"],
            "path": str(folder),
            "target": manifest["target"],
            "precision": manifest["precision"],
            "model_sha256": next(
                f["sha256"] for f in manifest["files"] if f["path"] == manifest["model"]
            ),
            "mlflow_run_id": manifest.get("mlflow_run_id"),
            "verified": True,
        },
        "device": device,
        "accuracy": accuracy,
        "latency": latency_by_threads,
        "peak_rss_mb": peak_rss_mb(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def arguments(description: str, threads: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("bundle", type=Path, help="the bundle folder (model, manifest, test set)")
    parser.add_argument("--out", type=Path, help="report path (default BUNDLE/report-<host>.json)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (20)")
    parser.add_argument("--iterations", type=int, default=300, help="timed calls (300)")
    if threads:
        parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                            help="thread counts to time (1 2)")  # fmt: skip
    return parser


def validate(
    target: str, runtime: str, version: str, opener: Callable, argv: list[str] | None
) -> int:
    """The whole device check of a ``target`` bundle: verify it, run its full test set, pc_* vs
    the teacher, batch-1 latency per thread count; write the report. Returns the exit code.

    ``opener(model_path, manifest, threads)`` loads the runtime and returns ``(run, max_batch)``
    with ``run(x) -> (logits, embeddings)``."""
    args = arguments(f"Validate an edgepc {target} bundle with {runtime} on this device.")
    args = args.parse_args(argv)
    if args.iterations < 2 or args.warmup < 0 or min(args.threads) < 1:
        return fail("need --iterations >= 2, --warmup >= 0 and --threads >= 1")
    try:
        manifest = read_bundle(args.bundle, target)
    except BundleError as error:
        return fail(str(error))
    model = args.bundle / manifest["model"]
    x, labels, teacher = load_testset(args.bundle, manifest)
    run, max_batch = opener(model, manifest, max(args.threads))
    step = max_batch or 500
    parts = [run(x[i : i + step]) for i in range(0, len(x), step)]
    logits = np.concatenate([p[0] for p in parts])
    embeddings = np.concatenate([p[1] for p in parts])
    accuracy = evaluate(logits, embeddings, labels, teacher)
    timings = {}
    for count in args.threads:
        one = opener(model, manifest, count)[0]
        timings[f"{count}t"] = latency(lambda one=one: one(x[:1]), args.warmup, args.iterations)
    report = make_report(args.bundle, manifest, device_info(runtime, version), accuracy, timings)
    out = args.out or Path(f"report-{manifest['name']}-{platform.node()}.json")
    write_report(out, report)
    fastest = min(timings.values(), key=lambda t: t["p50_ms"])
    print(
        f"{manifest['name']}: top-1 {accuracy['top1']:.4f}, triplet agreement "
        f"{accuracy['pc_triplet_agreement']:.4f}, p50 {fastest['p50_ms']:.3f} ms -> {out}"
    )
    return 0
