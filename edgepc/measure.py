"""Wall-clock and peak-memory measurement shared by benchmarks and validation."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{_STATUS} has no {field} line: peak RSS cannot be measured here")
    return int(match.group(1))


@dataclass
class PeakMemory:
    """Peak bytes allocated above the level at entry, filled in when the block exits."""

    bytes: int = 0


@contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak extra memory of a block of code on ``device``.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry. CPU: the process's
    peak resident set (VmHWM, reset through /proc/self/clear_refs) above the RSS at entry, so
    it needs Linux and counts every allocation of the process, torch's or not.
    """
    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - start
        return
    _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    start = _status_kib("VmRSS")
    yield result
    result.bytes = max(0, _status_kib("VmHWM") - start) * 1024


def median_seconds(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: torch.device | str = "cpu"
) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
