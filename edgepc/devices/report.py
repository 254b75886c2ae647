"""The schema of a device report (written by ``devices/common.py``) and its MLflow names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgepc.errors import EdgepcError

TIMINGS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput")


class ReportError(EdgepcError):
    """A device report is malformed, or does not belong to the store's runs."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BundleRef(_Strict):
    name: str = Field(pattern=r"^(cpu|mobile|jetson)-[a-z0-9_-]+$")
    path: str
    target: Literal["cpu", "mobile", "jetson"]
    precision: Literal["fp32", "int8"]
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    mlflow_run_id: str | None
    verified: Literal[True]


class Accuracy(_Strict):
    top1: float = Field(ge=0, le=1)
    images: int = Field(gt=0)
    pc_rank_gap: float
    pc_triplet_agreement: float = Field(ge=0, le=1)
    pc_spearman: float
    pc_images: int = Field(gt=2)


class Timing(_Strict):
    p50_ms: float = Field(gt=0)
    p90_ms: float = Field(gt=0)
    p99_ms: float = Field(gt=0)
    mean_ms: float = Field(gt=0)
    std_ms: float = Field(ge=0)
    warmup: int = Field(ge=0)
    iterations: int = Field(ge=2)
    throughput: float = Field(gt=0)


class Device(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # GPU, clocks, ... where present

    name: str
    cpu: str
    cores: int | None
    os: str
    runtime: str
    runtime_version: str


class DeviceReport(_Strict):
    report_version: Literal[1]
    bundle: BundleRef
    device: Device
    accuracy: Accuracy
    latency: dict[str, Timing]  # by thread count: "1t", "2t", ... (or "gpu")
    peak_rss_mb: float = Field(gt=0)
    created: str

    @property
    def artifact(self) -> str:
        """fp32, int8, int8_ptq: the prefix the validate stage uses for this bundle."""
        return self.bundle.name.removeprefix(f"{self.bundle.target}-").replace("-", "_")


def read_report(path: Path) -> DeviceReport:
    try:
        return DeviceReport.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ReportError(f"no report at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path} is not valid JSON ({error})") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ReportError(f"{path} is not a device report: {where}: {first['msg']}") from None


def device_key(name: str) -> str:
    """A device name usable as an MLflow metric prefix."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "device"


def report_metrics(report: DeviceReport, device: str) -> dict[str, float]:
    """``<device>.<artifact>_test_top1``, ``<device>.<artifact>_p50_ms_1t``, ...: the validate
    stage's names behind the device's prefix, so both line up in MLflow."""
    prefix = f"{device}.{report.artifact}_"
    accuracy = report.accuracy
    metrics: dict[str, Any] = {
        f"{prefix}test_top1": accuracy.top1,
        f"{prefix}test_pc_rank_gap": accuracy.pc_rank_gap,
        f"{prefix}test_pc_triplet_agreement": accuracy.pc_triplet_agreement,
        f"{prefix}test_pc_spearman": accuracy.pc_spearman,
        f"{prefix}peak_rss_mb": report.peak_rss_mb,
    }
    for threads, timing in report.latency.items():
        metrics |= {f"{prefix}{k}_{threads}": getattr(timing, k) for k in TIMINGS}
    return metrics
