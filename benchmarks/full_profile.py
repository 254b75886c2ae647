"""The full-profile study of the pipeline's first stages on the default data (Fashion-MNIST):
the teacher, then MobileNetV2-0.5 students distilled with PC at α = 0 (no labels) and α = 1,
against the same student trained from scratch on labels.

    python benchmarks/full_profile.py [--work DIR] [--out benchmarks/results] [key=value ...]

It runs the pipeline's own stage functions with ``edgepc/configs/cpu.yaml --profile full`` (plus the
overrides), but without the MLflow runner, so that it also runs on a bare GPU machine; each
stage's result is written to ``full_profile.json`` / ``.md`` as soon as it is known.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from edgepc.files import write_text
from edgepc.hardware import describe, pick_device
from edgepc.pipelines.config import load_config
from edgepc.pipelines.stages import StageContext, data_stage, distill_stage, teacher_stage

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
    device = pick_device(base.device)
    report: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "device": describe(device),
        "torch": torch.__version__,
        "config": base.model_dump(mode="json"),
        "teacher_model": base.teacher.model,
        "epochs": [],
    }

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / "full_profile.json", json.dumps(report, indent=2) + "\n")
        write_text(args.out / "full_profile.md", markdown(report))

    def context(name: str) -> StageContext:
        workdir = args.work / name
        workdir.mkdir(parents=True, exist_ok=True)

        def log(metrics: dict[str, float], step: int | None) -> None:
            report["epochs"].append({"stage": name, "epoch": step, **metrics})
            print(json.dumps(report["epochs"][-1]), flush=True)

        return StageContext(workdir, device, log, progress=False)

    started = time.perf_counter()
    data = data_stage(base, {}, context("data"))
    upstream = {"data": (args.work / "data", data)}
    started = time.perf_counter()
    teacher = teacher_stage(base, upstream, context("teacher"))
    report["teacher"] = {"metrics": teacher.metrics, "seconds": time.perf_counter() - started}
    save()
    upstream["teacher"] = (args.work / "teacher", teacher)
    report["students"] = {}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        config = load_config("cpu", profile="full", overrides=[*args.overrides, *overrides])
        started = time.perf_counter()
        result = distill_stage(config, upstream, context(f"student{i}"))
        report["students"][name] = {
            "metrics": result.metrics,
            "seconds": time.perf_counter() - started,
        }
        save()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
