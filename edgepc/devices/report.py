"""Device reports on the host: the schema of :mod:`edgepc_device.report` (one definition,
validated here with pydantic) and the report's MLflow names."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from edgepc.errors import EdgepcError, first_problem
from edgepc_device.report import Report, Timing

TIMINGS = tuple(f.name for f in dataclasses.fields(Timing) if f.name.endswith(("ms", "put")))
_REPORT = TypeAdapter(Report)


class ReportError(EdgepcError):
    """A device report is malformed, or does not belong to the store's runs."""


def read_report(path: Path) -> Report:
    try:
        return _REPORT.validate_python(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ReportError(f"no report at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path} is not valid JSON ({error})") from None
    except ValidationError as error:
        raise ReportError(f"{path} is not a device report: {first_problem(error)}") from None


def device_key(name: str) -> str:
    """A device name usable as an MLflow metric prefix."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "device"


def report_metrics(report: Report, device: str) -> dict[str, float]:
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
