"""The formulation study: which perception-coherence loss to run, chosen without the test split.

    python benchmarks/pc_variants.py                # study.yaml profile `screen` → docs/results/
    python benchmarks/pc_variants.py --report-only  # regenerate from docs/results/pc_variants.json

Each method of the profile (PC's variants, and as many trials over their own hyper-parameters
for the strongest feature-only baselines) trains once with the first seed; the best
``--confirm`` of each family (the loss a method runs) by the validation metric then train with
every seed, and the family's choice is the best mean over seeds. Only validation metrics decide;
the test split is shown once, after the choice. Runs are the study's pipeline runs (same cache
keys, same MLflow tags), read back from the records or MLflow when done already.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from edgepc.errors import EdgepcError
from edgepc.files import write_text
from edgepc.hardware import cpu_name
from edgepc.pipelines.config import CONFIGS
from edgepc.pipelines.runner import default_cache
from edgepc.study.execute import Executor, Recorded
from edgepc.study.protocol import Record, Run, Stat, Study, load_study, trials
from edgepc.study.report import reads, verdict
from edgepc.tracking import Tracker, git_commit

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "pc_variants.md"
# python benchmarks/loss_cost.py --sizes 256 --losses pc pc_q1024 rkd_angle rkd_distance crd
#   --name loss_cost_variants --out docs/results
COST = OUT.parent / "loss_cost_variants.json"
SHOWN = ("knn_top1", "probe_top1", "pc_triplet_agreement")


def _only(study: Study) -> tuple[str, str]:
    if len(study.pairs) != 1 or len(study.settings) != 1:
        raise ValueError("the screen profile must hold one pair and one setting")
    return next(iter(study.pairs)), next(iter(study.settings))


def _score(record: Record, select: str) -> float:
    return record.metrics[f"distill.val_{select}"]


def screen(study: Study, execute: Executor, confirm: int) -> list[Record]:
    """Every method once with the first seed, then each family's best ``confirm`` with every
    seed (phases ``screen`` and ``confirm``)."""
    pair, setting = _only(study)
    select = study.settings[setting].select
    first, *others = study.seeds
    records: list[Record] = []
    bar = tqdm(desc=study.name, unit="run")
    for method in study.methods:
        for run in trials(study, pair, setting, method, first):
            records.append(Record(run, "screen", execute(run)))
            bar.set_postfix_str(run.label)
            bar.update()
    for family in families(study):
        mine = [r for r in records if study.loss_of(r.run.method) == family]
        for best in sorted(mine, key=lambda r: -_score(r, select))[:confirm]:
            for seed in others:
                run = Run(**{**asdict(best.run), "seed": seed})
                records.append(Record(run, "confirm", execute(run)))
                bar.set_postfix_str(run.label)
                bar.update()
    bar.close()
    return records


def families(study: Study) -> list[str]:
    """The losses the profile's methods run, in order of first appearance."""
    return list(dict.fromkeys(study.loss_of(m) for m in study.methods))


def _by_method(records: list[Record]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = {}
    for r in records:
        grouped.setdefault(r.run.method, []).append(r)
    return grouped


def _confirmed(records: list[Record], seeds: int) -> dict[str, list[Record]]:
    """Methods with a run for every seed (the screen's first seed and the confirmations)."""
    return {m: rs for m, rs in _by_method(records).items() if len(rs) == seeds}


def chosen(study: Study, records: list[Record]) -> dict[str, str]:
    """Each family's method with the best mean validation metric over every seed."""
    _, setting = _only(study)
    select = study.settings[setting].select
    confirmed = _confirmed(records, len(study.seeds))
    best: dict[str, str] = {}
    for family in families(study):
        mine = {m: rs for m, rs in confirmed.items() if study.loss_of(m) == family}
        if mine:
            best[family] = max(mine, key=lambda m: _mean(mine[m], select))
    return best


def _mean(records: list[Record], select: str) -> float:
    return Stat.of([_score(r, select) for r in records]).mean


def _changes(study: Study, method: str) -> str:
    if method not in study.variants:
        return "the study's defaults"
    overrides = study.variants[method].overrides
    return ", ".join(f"`{o.removeprefix('distill.train.')}`" for o in overrides)


def report(study: Study, records: list[Record], command: str, seconds: float) -> str:
    pair, setting = _only(study)
    select = study.settings[setting].select
    screened = [r for r in records if r.phase == "screen"]
    confirmed = _confirmed(records, len(study.seeds))
    picks = chosen(study, records)
    first = study.seeds[0]
    teacher = study.pairs[pair].teacher
    lines = [
        f"# {study.name}: perception-coherence variants against matched baseline trials",
        "",
        f"Generated by `{command}` (never edit by hand) on "
        f"{datetime.now(UTC):%Y-%m-%d} · {cpu_name()} · commit {git_commit()[:10]}; "
        f"{len(records)} runs, this invocation took {seconds / 60:.1f} min.",
        "",
        f"- Pair: {study.pairs[pair].title}, {setting.replace('_', '-')}; every run is the "
        "study's pipeline run with the method's overrides. Overrides of the pair: "
        + ", ".join(f"`{o}`" for o in study.pairs[pair].overrides)
        + (f"; teacher weights `{teacher}`." if teacher else "."),
        f"- Selection uses the validation split only: each method once with seed {first}, then "
        f"the best of each family (the loss it runs) with seeds {study.seeds}; the family's "
        f"choice is the best mean validation {select}. Baseline families get as many trials "
        "over their own hyper-parameters as PC gets variants.",
        "",
        f"## Screen (seed {first}, validation split)",
        "",
        f"| family | method | reads | changes | val {select} | val probe_top1 | "
        "val triplet agreement | train img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family in families(study):
        mine = [r for r in screened if study.loss_of(r.run.method) == family]
        for r in sorted(mine, key=lambda r: -_score(r, select)):
            m = r.metrics
            lines.append(
                f"| {family} | {r.run.method} | {reads(family)} | {_changes(study, r.run.method)} "
                f"| {m[f'distill.val_{select}']:.4f} | {m['distill.val_probe_top1']:.4f} | "
                f"{m['distill.val_pc_triplet_agreement']:.4f} | "
                f"{m['distill.train_images_per_s']:.0f} |"
            )
    lines += [
        "",
        f"## Confirmation (seeds {study.seeds}, validation split, mean ± std)",
        "",
        f"| family | method | val {select} | val probe_top1 | val triplet agreement | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for family in families(study):
        mine = {m: rs for m, rs in confirmed.items() if study.loss_of(m) == family}
        for method, rs in sorted(mine.items(), key=lambda kv: -_mean(kv[1], select)):
            stats = [Stat.of([r.metrics[f"distill.val_{k}"] for r in rs]) for k in SHOWN]
            mark = "**chosen**" if picks.get(family) == method else ""
            lines.append(f"| {family} | {method} | " + " | ".join(map(str, stats)) + f" | {mark} |")
    if "pc" in picks and len(picks) > 1:
        lines += [
            "",
            "## After the choice: the test split (seeds " + f"{study.seeds})",
            "",
            "Shown once the choice is made; nothing above read it.",
            "",
            "| family | chosen | test knn_top1 | test probe_top1 | test triplet agreement | "
            "PC's kNN verdict | PC's probe verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        test = {f: {k: Stat.of([r.metrics[f"distill.test_{k}"] for r in confirmed[m]])
                    for k in SHOWN} for f, m in picks.items()}  # fmt: skip
        for family, method in picks.items():
            t = test[family]
            against = ["—", "—"] if family == "pc" else [
                verdict(test["pc"][k], t[k]) for k in ("knn_top1", "probe_top1")]  # fmt: skip
            lines.append(f"| {family} | {method} | " + " | ".join(str(t[k]) for k in SHOWN)
                         + " | " + " | ".join(against) + " |")  # fmt: skip
    return "\n".join([*lines, *step_cost(COST)]) + "\n"


def step_cost(path: Path) -> list[str]:
    """The loss_cost run beside the report (forward + backward of each loss), if there is one."""
    if not path.is_file():
        return []
    cost = json.loads(path.read_text())
    points = [p for p in cost["points"] if p["seconds"] is not None]
    cells = [f"| {p['loss']} | {p['batch']} | {1000 * p['seconds']:.1f} | {p['peak_mib']:.0f} |"
             for p in points]  # fmt: skip
    return [
        "",
        "## Cost of one step of each loss",
        "",
        f"Forward + backward on random features (d_S = 128, d_T = 512), {cost['device_name']}, "
        f"{cost['threads']} threads, median of {cost['repeats']}: `{cost['command']}` "
        f"({cost['when'][:10]}).",
        "",
        "| loss | B | ms | peak extra MiB |",
        "|---|---|---|---|",
        *cells,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIGS / "study.yaml")
    parser.add_argument("--profile", default="screen")
    parser.add_argument("--confirm", type=int, default=3, help="methods per family with every seed")
    parser.add_argument("--methods", nargs="+", help="only these methods (split across processes)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=None, help=f"default {default_cache()}")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the project's)")
    parser.add_argument("--report-only", action="store_true", help="train nothing")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        study = load_study(args.config, args.profile)
        if args.methods:
            unknown = sorted(set(args.methods) - set(study.methods))
            if unknown:
                raise ValueError(f"unknown methods {unknown}; the profile has {study.methods}")
            study = study.model_copy(update={"methods": args.methods})
        recorded = Recorded.read(args.out.with_suffix(".json"))
        execute = Executor(study, Tracker(args.tracking_uri), args.cache or default_cache(),
                           args.report_only, recorded)  # fmt: skip
        records = screen(study, execute, args.confirm)
    except (EdgepcError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "python benchmarks/pc_variants.py " + " ".join(argv or sys.argv[1:])
    if args.methods:  # a part: its runs are in MLflow; the whole report comes from a full run
        print(f"{execute.trained} runs trained, {execute.reused} read back")
        return 0
    write_text(args.out, report(study, records, command.strip(), time.perf_counter() - started))
    raw = {"study": study.model_dump(), "python": platform.python_version(),
           "devices": execute.devices, "chosen": chosen(study, records),
           "records": [{"run": asdict(r.run), "phase": r.phase, "metrics": r.metrics}
                       for r in records]}  # fmt: skip
    write_text(args.out.with_suffix(".json"), json.dumps(raw, indent=1))
    print(f"{execute.trained} runs trained, {execute.reused} read back; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
