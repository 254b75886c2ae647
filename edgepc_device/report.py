"""The device report: its schema (stdlib dataclasses whose checks run where the report is made
and where it is read: the host validates the same classes with pydantic), the device's facts,
and the writer."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPORT_VERSION = 1
TARGETS = ("cpu", "mobile", "jetson")
STRICT = {"extra": "forbid"}  # pydantic's config for these classes (a plain dict: no import)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class BundleRef:
    __pydantic_config__ = STRICT

    name: str
    path: str
    target: str
    precision: str
    model_sha256: str
    mlflow_run_id: str | None
    verified: bool

    def __post_init__(self) -> None:
        _check(self.target in TARGETS, f"target {self.target!r} is not one of {TARGETS}")
        _check(re.fullmatch(rf"{self.target}-[a-z0-9_-]+", self.name) is not None,
               f"bundle name {self.name!r} is not {self.target}-<artifact>")  # fmt: skip
        _check(self.precision in ("fp32", "int8"), f"precision {self.precision!r}")
        _check(re.fullmatch(r"[0-9a-f]{64}", self.model_sha256) is not None, "model_sha256")
        _check(self.verified is True, "the bundle was not verified")


@dataclass(frozen=True)
class Accuracy:
    __pydantic_config__ = STRICT

    top1: float
    images: int
    pc_rank_gap: float
    pc_triplet_agreement: float
    pc_spearman: float
    pc_images: int

    def __post_init__(self) -> None:
        _check(0 <= self.top1 <= 1, f"top1 {self.top1} is not in [0, 1]")
        _check(0 <= self.pc_triplet_agreement <= 1, "pc_triplet_agreement is not in [0, 1]")
        _check(self.images > 0 and self.pc_images > 2, "too few images")


@dataclass(frozen=True)
class Timing:
    __pydantic_config__ = STRICT

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    warmup: int
    iterations: int
    throughput: float

    def __post_init__(self) -> None:
        _check(min(self.p50_ms, self.p90_ms, self.p99_ms, self.mean_ms, self.throughput) > 0,
               "latencies and throughput must be positive")  # fmt: skip
        _check(self.std_ms >= 0 and self.warmup >= 0 and self.iterations >= 2, "timing counts")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


DEVICE_FACTS = ("name", "cpu", "cores", "os", "runtime", "runtime_version")


@dataclass(frozen=True)
class Report:
    """``report.json`` of a device run, schema version ``REPORT_VERSION``."""

    __pydantic_config__ = STRICT

    report_version: int
    bundle: BundleRef
    device: dict[str, Any]  # DEVICE_FACTS, and the GPU, power mode, ... where present
    accuracy: Accuracy
    latency: dict[str, Timing]  # by thread count: "1t", "2t", ... (or "gpu")
    peak_rss_mb: float
    created: str

    def __post_init__(self) -> None:
        _check(self.report_version == REPORT_VERSION, f"report_version is not {REPORT_VERSION}")
        missing = [k for k in DEVICE_FACTS if k not in self.device]
        _check(not missing, f"device lacks {missing}")
        _check(self.peak_rss_mb > 0, "peak_rss_mb must be positive")

    @property
    def artifact(self) -> str:
        """fp32, int8, int8_ptq: the prefix the validate stage uses for this bundle."""
        return self.bundle.name.removeprefix(f"{self.bundle.target}-").replace("-", "_")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(runtime: str, extra: dict | None = None) -> dict:
    """This device's facts; ``runtime``: "<package> <version>"."""
    package, _, runtime_version = runtime.partition(" ")
    return {
        "name": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "runtime": package,
        "runtime_version": runtime_version,
        **(extra or {}),
    }


def peak_rss_mb() -> float:
    """The process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def make_report(
    folder: Path, manifest: dict, device: dict, accuracy: dict, latency: dict
) -> Report:
    model = next(f for f in manifest["files"] if f["path"] == manifest["model"])
    bundle = BundleRef(manifest["name"], str(folder), manifest["target"], manifest["precision"],
                       model["sha256"], manifest.get("mlflow_run_id"), True)  # fmt: skip
    timings = {k: Timing(**v) for k, v in latency.items()}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Report(REPORT_VERSION, bundle, device, Accuracy(**accuracy), timings, peak_rss_mb(),
                  created)  # fmt: skip


def write_report(path: Path, report: Report) -> Path:
    """Atomically: a report file is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(report), indent=2))
    os.replace(tmp, path)
    return path
