"""``python -m edgepc.devices.compare [--out devices-compare.png]``.

Every device report ingested into the store, as one table (device × artifact: top-1, triplet
agreement vs the teacher, batch-1 p50/p99 per thread count) and one plot; the plot is also
logged to each export run it covers (under ``devices/``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from edgepc.errors import EdgepcError, one_line_errors
from edgepc.files import save_figure
from edgepc.tracking import Tracker

METRIC = re.compile(r"^(?P<device>[A-Za-z0-9_-]+)\.(?P<artifact>fp32|int8|int8_ptq)_(?P<what>.+)$")


def collect(runs: list[dict]) -> list[dict]:
    """Rows {device, run_id, target, artifact, runtime, metrics} from export runs' metrics."""
    rows: dict[tuple[str, str, str], dict] = {}
    for run in runs:
        devices = {k.removeprefix("edgepc.device."): v for k, v in run["tags"].items()
                   if k.startswith("edgepc.device.")}  # fmt: skip
        for name, value in run["metrics"].items():
            match = METRIC.match(name)
            if match is None or match["device"] not in devices:
                continue
            key = (match["device"], run["run_id"], match["artifact"])
            row = rows.setdefault(key, {
                "device": match["device"], "run_id": run["run_id"],
                "target": run["tags"].get("edgepc.target", "?"), "artifact": match["artifact"],
                "runtime": devices[match["device"]], "metrics": {},
            })  # fmt: skip
            row["metrics"][match["what"]] = value
    return sorted(rows.values(), key=lambda r: (r["target"], r["artifact"], r["device"]))


def table(rows: list[dict]) -> str:
    threads = sorted({m.split("_")[-1] for r in rows for m in r["metrics"] if "_p50_ms_" in
                      f"_{m}"}, key=lambda t: (len(t), t))  # fmt: skip
    head = " | ".join(f"p50 / p99 ms ({t})" for t in threads)
    lines = [f"| device | target | artifact | top-1 | triplet vs teacher | {head} | runtime |",
             "|---|---|---|---|---|" + "---|" * len(threads) + "---|"]  # fmt: skip
    for row in rows:
        m = row["metrics"]
        times = " | ".join(
            f"{m[f'p50_ms_{t}']:.3f} / {m[f'p99_ms_{t}']:.3f}" if f"p50_ms_{t}" in m else "-"
            for t in threads
        )
        lines.append(
            f"| {row['device']} | {row['target']} | {row['artifact']} | "
            f"{m.get('test_top1', float('nan')):.4f} | "
            f"{m.get('test_pc_triplet_agreement', float('nan')):.4f} | {times} | {row['runtime']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    """p50 at 1 thread per artifact, one bar per device."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    artifacts = sorted({f"{r['target']}-{r['artifact']}" for r in rows})
    devices = sorted({r["device"] for r in rows})
    width = 0.8 / len(devices)
    fig, axis = plt.subplots(figsize=(max(6, 1.2 * len(artifacts)), 3.8))
    for i, device in enumerate(devices):
        values = []
        for artifact in artifacts:
            found = [r["metrics"].get("p50_ms_1t", 0.0) for r in rows if r["device"] == device
                     and f"{r['target']}-{r['artifact']}" == artifact]  # fmt: skip
            values.append(found[0] if found else 0.0)
        axis.bar([j + i * width for j in range(len(artifacts))], values, width, label=device)
    axis.set_xticks([j + width * (len(devices) - 1) / 2 for j in range(len(artifacts))], artifacts)
    axis.set(ylabel="p50 ms, batch 1, 1 thread", title="edgepc artifacts across devices")
    axis.legend()
    fig.tight_layout()
    return save_figure(fig, path)


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepc.devices.compare", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("devices-compare.png"))
    args = parser.parse_args(argv)
    tracker = Tracker()
    rows = collect(tracker.runs.of_stage("export"))
    if not rows:
        raise EdgepcError(
            f"no device reports in {tracker.uri}: run python -m edgepc.devices.ingest first"
        )
    print(table(rows))
    plot(rows, args.out)
    for run_id in sorted({r["run_id"] for r in rows}):
        tracker.attach(run_id, {}, {}, {args.out: "devices"})
    print(f"plot: {args.out} (also in each export run under devices/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
