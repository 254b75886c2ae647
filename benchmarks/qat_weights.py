"""Choose the qat stage's loss weights (β, γ) on the validation split.

    python benchmarks/qat_weights.py --target jetson --profile quick [key=value ...]
        [--grid 0,0 1,1 ...] [--cache DIR] [--out DIR]

Runs the pipeline up to its qat stage once per (β, γ) of the grid (data, teacher and student
are cached and shared) and writes ``benchmarks/results/qat_weights-TARGET-PROFILE.{json,md}``:
validation top-1 and triplet agreement (vs teacher, vs fp32 student) of each QAT model after
fine-tuning. The pick: the highest triplet agreement vs the teacher among settings within 0.5
top-1 points of the best.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgepc.files import write_text
from edgepc.pipelines.config import load_config
from edgepc.pipelines.runner import run_pipeline
from edgepc.targets import TARGETS

GRID = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (3.0, 3.0))
RESULTS = Path(__file__).resolve().parent / "results"


def weights(text: str) -> tuple[float, float]:
    """``"β,γ"`` -> (β, γ)."""
    beta, gamma = (float(v) for v in text.split(","))
    return beta, gamma


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="jetson", choices=list(TARGETS))
    parser.add_argument("--profile", choices=["quick", "full"])
    parser.add_argument("--cache", type=Path, help="the pipeline cache (default: the project's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and markdown")
    parser.add_argument("--grid", nargs="+", type=weights, default=GRID, metavar="BETA,GAMMA")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    rows = []
    for beta, gamma in args.grid:
        overrides = [*args.overrides, f"qat.train.beta={beta}", f"qat.train.gamma={gamma}"]
        config = load_config(args.target, profile=args.profile, overrides=overrides)
        started = time.perf_counter()
        report = run_pipeline(config, args.cache, progress=False, echo=lambda _: None,
                              until="qat")  # fmt: skip
        (qat,) = (s.metrics for s in report.stages if s.stage == "qat")
        rows.append(
            {
                "beta": beta,
                "gamma": gamma,
                "val_top1": qat["qat_val_top1"],
                "val_pc_triplet_agreement": qat["qat_val_pc_triplet_agreement"],
                "val_pc_triplet_agreement_fp32": qat["qat_val_pc_triplet_agreement_fp32"],
                "seconds": time.perf_counter() - started,
            }
        )
        print(rows[-1], flush=True)
    best_top1 = max(r["val_top1"] for r in rows)
    pick = max(
        (r for r in rows if r["val_top1"] >= best_top1 - 0.005),
        key=lambda r: r["val_pc_triplet_agreement"],
    )
    name = f"qat_weights-{args.target}-{args.profile or 'default'}"
    record = {"target": args.target, "profile": args.profile, "overrides": args.overrides,
              "rows": rows, "pick": pick}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{name}.json", json.dumps(record, indent=2))
    lines = [
        f"# QAT loss weights on the validation split ({args.target}, profile {args.profile})",
        "",
        f"Overrides: `{' '.join(args.overrides) or 'none'}`. Pick: β = {pick['beta']}, "
        f"γ = {pick['gamma']} (best triplet agreement within 0.5 top-1 points of the best).",
        "",
        "| β | γ | val top-1 | val triplet vs teacher | val triplet vs fp32 | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['beta']} | {r['gamma']} | {r['val_top1']:.4f} | "
        f"{r['val_pc_triplet_agreement']:.4f} | {r['val_pc_triplet_agreement_fp32']:.4f} | "
        f"{r['seconds']:.0f} |"
        for r in rows
    ]
    write_text(args.out / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
