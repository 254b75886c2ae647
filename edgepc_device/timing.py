"""Batch-1 latency: per-call milliseconds after warm-up calls, and their summary (the one
summary of edgepc: edgepc.measure's interleaved timer reports the same fields)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def summarise(times_ms: list[float], warmup: int) -> dict[str, float]:
    """Percentiles (linear interpolation of the sorted times, inclusive), mean, spread and
    calls per second of ``times_ms``."""
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


def latency(fn: Callable[[], object], warmup: int, iterations: int) -> dict[str, float]:
    """``fn()`` timed call by call after ``warmup`` untimed calls."""
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
