"""The full-profile study of the pipeline's first stages on the default data (Fashion-MNIST):
the teacher, then MobileNetV2-0.5 students distilled with PC at α = 0 (no labels) and α = 1,
against the same student trained from scratch on labels.

    python benchmarks/full_profile.py [--work DIR] [--out benchmarks/results] [key=value ...]

It runs the pipeline up to distill with ``edgepc/configs/cpu.yaml --profile full`` (plus the
overrides) in a cache of its own and without MLflow (the runner's no-op tracker, which also
collects the per-epoch metrics), so that it runs on a bare GPU machine; each student's result
is written to ``full_profile.json`` / ``.md`` as soon as it is known.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from edgepc.files import write_text
from edgepc.hardware import describe, pick_device
from edgepc.pipelines.config import load_config
from edgepc.pipelines.runner import run_pipeline
from edgepc.tracking import NoTracking

VARIANTS = {
    "pc, α = 0 (no labels)": ["distill.train.alpha=0.0", "distill.train.beta=1.0"],
    "pc, α = 1": ["distill.train.alpha=1.0", "distill.train.beta=1.0"],
    "scratch (CE only)": ["distill.train.alpha=1.0", "distill.train.beta=0.0"],
}
SHOWN = ("test_top1", "test_knn_top1", "test_pc_rank_gap", "test_pc_triplet_agreement",
         "test_pc_spearman")  # fmt: skip


def markdown(report: dict) -> str:
    lines = [
        "# Full profile: Fashion-MNIST, teacher → MobileNetV2-0.5",
        "",
        f"{report['when']} · {report['device']} · torch {report['torch']} · `{report['command']}`",
        "",
    ]
    if "teacher" in report:
        t = report["teacher"]
        lines.append(
            f"Teacher {report['teacher_model']}: test top-1 {t['metrics']['test_top1']:.4f}, "
            f"kNN top-1 {t['metrics']['test_knn_top1']:.4f} ({t['seconds']:.0f} s)."
        )
        lines.append("")
    lines += ["| student | " + " | ".join(SHOWN) + " | seconds |", "|---" * (len(SHOWN) + 2) + "|"]
    for name, row in report.get("students", {}).items():
        cells = [f"{row['metrics'].get(k, float('nan')):.4f}" for k in SHOWN]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--work", type=Path, default=Path(".edgepc-cache/full-profile"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    base = load_config("cpu", profile="full", overrides=args.overrides)
    report: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "device": describe(pick_device(base.device)),
        "torch": torch.__version__,
        "config": base.model_dump(mode="json"),
        "teacher_model": base.teacher.model,
        "epochs": [],
    }

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / "full_profile.json", json.dumps(report, indent=2) + "\n")
        write_text(args.out / "full_profile.md", markdown(report))

    class EpochLog(NoTracking):
        """Nothing tracked; each epoch's metrics kept in the report and printed."""

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if step is not None:
                report["epochs"].append({"epoch": step, **metrics})
                print(json.dumps(report["epochs"][-1]), flush=True)

    report["students"] = {}
    for name, overrides in VARIANTS.items():
        config = load_config("cpu", profile="full", overrides=[*args.overrides, *overrides])
        run = run_pipeline(config, args.work, EpochLog(), progress=False, until="distill")
        stages = {s.stage: s for s in run.stages}
        if "teacher" not in report:  # trained by the first student's run, cached after
            report["teacher"] = {"metrics": stages["teacher"].metrics,
                                 "seconds": stages["teacher"].seconds}  # fmt: skip
        report["students"][name] = {"metrics": stages["distill"].metrics,
                                    "seconds": stages["distill"].seconds}  # fmt: skip
        save()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
