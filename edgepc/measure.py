"""Wall-clock, latency and peak-memory measurement shared by benchmarks and validation."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import multiprocessing
import multiprocessing.connection
import random
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from edgepc_device.report import Timing as Latency  # one schema: a report's timings
from edgepc_device.timing import summarise

K = TypeVar("K")

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@functools.cache
def _map_allocations_separately() -> None:
    """Make glibc give every allocation >= 64 KiB its own mapping, returned on free.

    Otherwise freed blocks stay in the heap, a later block reuses resident pages and the RSS
    peak undercounts it. Process-wide and permanent; it slows later allocations a little.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: CPU peak memory would be wrong")


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
    it needs Linux with glibc and counts every allocation of the process, torch's or not.
    Freed heap blocks that a process already holds can hide an allocation from the RSS: for an
    exact CPU figure use :func:`peak_memory_in_fresh_process`.
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


def _child(
    conn: multiprocessing.connection.Connection,
    prepare: Callable,
    args: tuple,
    device: str,
    warmup: bool,
) -> None:
    try:
        thunk = prepare(*args)
        if warmup:
            # One-time set-up (thread pools, lazy kernels) is not the thunk's own cost; blocks
            # the warm-up frees must not hide later allocations from the RSS.
            _map_allocations_separately()
            thunk()
        with peak_memory(device) as peak:
            value = thunk()
        conn.send(("ok", (peak.bytes, value)))
    except Exception as error:  # reported to the parent, which raises it
        conn.send(("error", f"{type(error).__name__}: {error}"))


def peak_memory_in_fresh_process(
    prepare: Callable[..., Callable[[], object]],
    args: tuple = (),
    device: str = "cpu",
    warmup: bool = True,
) -> tuple[int, object]:
    """Peak extra bytes of ``prepare(*args)()`` on ``device`` measured in a new process, and
    what the call returned (it must pickle).

    ``prepare`` must be importable (module level): it builds the inputs and returns the thunk
    whose peak is measured. With ``warmup`` it is called once before, and the process maps
    every allocation >= 64 KiB separately so freed blocks leave the RSS: the CPU figure is
    exact, but allocation-heavy code runs slower. Without, the figure also holds one-time
    set-up (a few MiB): an upper bound.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(child, prepare, args, device, warmup))
    process.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        status, value = "error", f"the process died (exit code {process.exitcode}): out of memory?"
    process.join()
    if status != "ok":
        raise RuntimeError(f"memory probe of {prepare.__name__}{args} failed: {value}")
    peak_bytes, returned = value
    return int(peak_bytes), returned


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


def latency(fn: Callable[[], object], warmup: int = 20, iterations: int = 200) -> Latency:
    """Time ``fn()`` call by call: the one timer of benchmarks and the validate stage.

    Percentiles are linear interpolations of the sorted times (``statistics.quantiles``,
    inclusive); run it with the runtime's thread count pinned, on an otherwise idle machine.
    """
    return interleaved_latency({0: fn}, warmup, iterations)[0]


def interleaved_latency(
    fns: Mapping[K, Callable[[], object]], warmup: int = 20, iterations: int = 200, block: int = 10
) -> dict[K, Latency]:
    """Time several ``fns`` against each other: after ``warmup`` calls of each, turns of
    ``block`` timed calls, every fn once per round in an order shuffled per round (seeded), until
    each has made ``iterations`` calls; percentiles are over all of its calls.

    Short turns matter on a shared machine: there a fn's speed swings by up to 1.5× in spells
    of a tenth of a second or more, and turns of a hundred calls let those spells decide which
    of two files is faster (measured on a 2-core EPYC: fp32 / int8 from 1.04× to 1.38× across
    runs with turns of 200 calls, 1.07× to 1.08× with turns of 10)."""
    if iterations < 2 or block < 1:
        raise ValueError(f"latency needs at least 2 timed iterations in turns of at least 1 call, "
                         f"got {iterations} iterations, block {block}")  # fmt: skip
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[K, list[float]] = {key: [] for key in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for done in range(0, iterations, block):
        shuffle(order)
        for key in order:
            fn = fns[key]
            for _ in range(min(block, iterations - done)):
                start = time.perf_counter_ns()
                fn()
                times[key].append((time.perf_counter_ns() - start) / 1e6)
    return {key: _summary(t, warmup) for key, t in times.items()}


def interleaved_latency_by_threads(
    fns: Mapping[tuple, Callable[[], object]],
    warmup: int = 20,
    iterations: int = 200,
    block: int = 10,
) -> dict[tuple, Latency]:
    """:func:`interleaved_latency` of ``fns`` keyed ``(..., thread count)``, one thread count
    after the other: a multi-threaded session's workers spin on after its turn and stall the
    next turn (1-thread p99 4.3 ms instead of 0.2-0.4 for a 0.1 ms CNN on 2 cores)."""
    timed: dict[tuple, Latency] = {}
    for count in dict.fromkeys(key[-1] for key in fns):
        same = {key: fn for key, fn in fns.items() if key[-1] == count}
        timed |= interleaved_latency(same, warmup, iterations, block)
    return timed


def _summary(times: list[float], warmup: int) -> Latency:
    """The device timer's summary (:func:`edgepc_device.timing.summarise`), typed."""
    return Latency(**summarise(times, warmup))
