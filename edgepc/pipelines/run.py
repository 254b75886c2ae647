"""``python -m edgepc.pipelines.run TARGET [--profile quick|full] [key=value ...]``.

Runs data → teacher → distill → qat → export → validate → register for the config
(``edgepc/configs/TARGET.yaml``), skipping stages whose inputs are unchanged, and ends with a
summary table (every artifact with its accuracy, coherence, latency and size) and where to see
the runs.

Data-parallel on N processes: ``torchrun --nproc_per_node=N -m edgepc.pipelines.run TARGET ...``
(NCCL on GPUs, gloo on CPUs). The training stages run on every rank with a global batch of
N × batch_size (scale the learning rate with it); rank 0 alone runs the other stages, writes the
cache and MLflow runs, and prints the summary.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from edgepc.distill.distributed import init_from_env, local_device, rank
from edgepc.errors import EdgepcError
from edgepc.hardware import pick_device
from edgepc.pipelines.config import CONFIGS, load_config
from edgepc.pipelines.runner import (
    STAGES,
    PipelineReport,
    default_cache,
    run_pipeline,
)
from edgepc.targets import TARGETS

KEY_METRICS = (
    "train_size",
    "test_top1",
    "test_knn_top1",
    "test_pc_triplet_agreement",
    "ptq_test_top1",
    "qat_test_top1",
    "qat_test_pc_triplet_agreement",
    "int8_parity_top1_agreement",
    "fp32_test_top1",
    "int8_test_top1",
    "int8_drop_points",
    "int8_p50_ms_1t",
    "int8_speed_vs_fp32_1t",
    "int8_version",
)


def summary(report: PipelineReport) -> str:
    """The closing table: stage, status, seconds, key metrics, MLflow run."""
    rows = [("stage", "status", "seconds", "key metrics", "mlflow run")]
    for s in report.stages:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in s.metrics.items() if k in KEY_METRICS)
        rows.append((s.stage, s.status, f"{s.seconds:.1f}", shown, s.run_id or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if report.artifacts:
        lines += ["", report.artifacts.rstrip()]
    where = report.tracking_uri
    lines.append(f"\n{report.name}: MLflow parent run {report.run_id} in {where}")
    if not where.startswith("http"):
        lines.append("open the UI with: python -m edgepc.pipelines.ui")
    return "\n".join(lines)


def side_by_side(reports: list[PipelineReport]) -> str:
    """Every artifact of several pipelines in one table (their runtimes, batch 1, 1 thread)."""
    lines = [
        "| artifact | top-1 | drop (points) | triplet vs teacher | p50 ms | p99 ms | MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        for name, row in report.rows.items():
            lines.append(
                f"| {name} | {row['test_top1']:.4f} | {row['drop_points']:+.2f} | "
                f"{row['test_pc_triplet_agreement']:.4f} | {row.get('p50_ms_1t', float('nan')):.3f}"
                f" | {row.get('p99_ms_1t', float('nan')):.3f} | {row['size_mb']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepc.pipelines.run", description=__doc__)
    parser.add_argument("target", choices=[*TARGETS, "all"], help="which deployment target")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. distill.train.epochs=3")
    parser.add_argument("--config", type=Path, help=f"config file (default {CONFIGS}/TARGET.yaml)")
    parser.add_argument(
        "--profile",
        choices=["quick", "full", "folder"],
        help="a profile of the config (folder: examples/fashion_folder.py)",
    )
    parser.add_argument("--cache", type=Path, default=None, help=f"default {default_cache()}")
    parser.add_argument("--until", choices=[s.name for s in STAGES], help="stop after this stage")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    args = parser.parse_intermixed_args(argv)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    try:
        reports = []
        for target in targets:
            config = load_config(target, args.config, args.profile, args.overrides)
            init_from_env(local_device(pick_device(config.device)))  # under torchrun
            progress = not args.no_progress
            report = run_pipeline(config, args.cache, progress=progress, until=args.until)
            if rank() == 0:
                reports.append(report)
                print(summary(report))
        if len(reports) > 1 and all(r.rows for r in reports):
            print(f"\nall artifacts (batch 1, 1 thread):\n{side_by_side(reports)}")
    except EdgepcError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
