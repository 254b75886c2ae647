"""``python -m edgepc.devices.ingest REPORT [REPORT ...] [--device NAME]``.

Attaches each device report to the MLflow run that exported its bundle (the manifest's
``mlflow_run_id``): metrics under the device's prefix, the report as an artifact
(``devices/<device>/``), and a tag ``edgepc.device.<device>``. A report whose model sha256
differs from the exported bundle's is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgepc.devices.report import ReportError, device_key, read_report, report_metrics
from edgepc.errors import one_line_errors
from edgepc.tracking import Tracker


def ingest(path: Path, tracker: Tracker, device: str | None = None) -> tuple[str, str]:
    """Attach one report; returns (run id, device key)."""
    report = read_report(path)
    run_id = report.bundle.mlflow_run_id
    if run_id is None or tracker.runs.find(run_id) is None:
        raise ReportError(
            f"{path}: its bundle's run {run_id} is not in {tracker.uri}: point "
            "MLFLOW_TRACKING_URI at the store of the pipeline that exported it"
        )
    manifest = tracker.runs.read_artifact(run_id, f"export/{report.bundle.name}/manifest.json")
    if manifest is None:
        raise ReportError(f"{path}: run {run_id} holds no bundle {report.bundle.name!r}")
    files = json.loads(manifest)["files"]
    exported = next(f["sha256"] for f in files if f["path"] == json.loads(manifest)["model"])
    if exported != report.bundle.model_sha256:
        raise ReportError(
            f"{path}: the device ran a model with another sha256 than run {run_id} exported "
            f"for {report.bundle.name}; validate the registered bundle, not a rebuilt one"
        )
    facts = report.device
    key = device_key(device or facts["name"])
    described = f"{facts['cpu']}; {facts['runtime']} {facts['runtime_version']}"
    tracker.attach(
        run_id,
        report_metrics(report, key),
        {f"edgepc.device.{key}": described},
        {path: f"devices/{key}"},
    )
    return run_id, key


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepc.devices.ingest", description=__doc__)
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files")
    parser.add_argument("--device", help="device name to file them under (default: hostname)")
    args = parser.parse_args(argv)
    tracker = Tracker()
    for path in args.reports:
        run_id, key = ingest(path, tracker, args.device)
        print(f"{path}: attached to run {run_id} as device {key!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
