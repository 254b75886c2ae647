"""The study's report: mean ± std per method, verdicts against the best baselines, the tally,
the grid, the int8 rows, the figures and the step cost of each loss."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from edgepc import __version__
from edgepc.distill.losses import loss_class
from edgepc.files import save_figure
from edgepc.hardware import cpu_name
from edgepc.study.protocol import (
    Record,
    Run,
    Stat,
    Study,
    choose,
    final_records,
    summarise,
)
from edgepc.tracking import git_commit


def _difference(pc: Stat, other: Stat) -> tuple[float, float]:
    """PC's mean minus the other's, and the standard error of that difference."""
    se = math.sqrt(pc.std**2 / max(pc.n, 1) + other.std**2 / max(other.n, 1))
    return pc.mean - other.mean, se


def outcome(pc: Stat, other: Stat, lower_is_better: bool = False) -> str:
    """``wins``, ``tie`` or ``loses`` for PC (|Δ| ≤ 2 SE is a tie); ``one seed`` without noise."""
    if pc.n < 2 or other.n < 2:
        return "one seed"
    diff, se = _difference(pc, other)
    if abs(diff) <= 2 * se:
        return "tie"
    return "wins" if (diff > 0) != lower_is_better else "loses"


def verdict(pc: Stat, other: Stat, lower_is_better: bool = False) -> str:
    """The outcome for PC with its difference of means and twice its standard error."""
    word = outcome(pc, other, lower_is_better)
    if word == "one seed":
        return "one seed: no noise estimate"
    diff, se = _difference(pc, other)
    return f"{word} (Δ {100 * diff:+.2f} points, 2·SE {200 * se:.2f})"


# ---------------------------------------------------------------------------------- report


def _metric_for(setting: str) -> list[str]:
    return ["top1", "knn_top1", "probe_top1"] if setting == "class_aware" else [
        "knn_top1", "probe_top1"]  # fmt: skip


def method_table(study: Study, records: list[Record], pair: str, setting: str) -> str:
    final = final_records(records, pair, setting)
    rows = summarise(final)
    chosen = {r.run.method: r.run for r in final}
    metrics = _metric_for(setting)
    select = study.settings[setting].select
    head = ["method", "reads", "chosen", f"val {select}", *(f"test {m}" for m in metrics),
            "triplet agreement", "spearman", "train img/s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in study.methods:
        if method not in rows:
            continue
        s, run = rows[method], chosen[method]
        value = "—" if run.value is None else f"{run.knob.split('.')[-1]} = {run.value:g}"
        cells = [method, reads(method), value, str(s[f"val_{select}"]),
                 *(str(s[f"test_{m}"]) for m in metrics),
                 str(s["test_pc_triplet_agreement"]), str(s["test_pc_spearman"]),
                 f"{s['train_images_per_s'].mean:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(records: list[Record], pair: str, setting: str, select: str) -> str:
    tuned = [
        r for r in records if r.phase == "tune" and (r.run.pair, r.run.setting) == (pair, setting)
    ]
    by_method: dict[str, list[Record]] = {}
    for r in tuned:
        by_method.setdefault(r.run.method, []).append(r)
    lines = [f"| method | trials: value → val {select} (first seed) |", "|---|---|"]
    for method, rs in by_method.items():
        best = choose(rs, select)
        cells = []
        for r in rs:
            v = "—" if r.run.value is None else f"{r.run.value:g}"
            text = f"{v} → {r.metrics[f'distill.val_{select}']:.4f}"
            cells.append(f"**{text}**" if r is best else text)
        lines.append(f"| {method} | {'; '.join(cells)} |")
    return "\n".join(lines)


# What each method learns from besides the images: the protocol's grouping.
FEATURES, LOGITS, LABELS = "feature-only", "teacher logits", "labels only"


def reads(method: str) -> str:
    """The signal a method transfers: the teacher's features only (FitNet, RKD, PKT, SP, CRD,
    PC), its class logits (KD, DIST: a class signal even at α = 0), or labels (scratch)."""
    if method == "scratch":
        return LABELS
    return FEATURES if loss_class(method).inputs == "features" else LOGITS


@dataclass(frozen=True)
class Best:
    """The best baseline of a group on one metric: its name and its statistic."""

    method: str
    stat: Stat


@dataclass(frozen=True)
class Comparison:
    """PC on one test metric of one pair and setting, against the best feature-only baseline
    (the headline: methods that read what PC reads) and the best baseline of any signal."""

    metric: str
    rank: int  # PC's rank among every method, scratch included
    methods: int
    pc: Stat
    feature_only: Best | None  # None: no feature-only baseline has every seed
    overall: Best


def compare(records: list[Record], pair: str, setting: str) -> list[Comparison]:
    rows = summarise(final_records(records, pair, setting))
    if "pc" not in rows:
        return []
    found = []
    for metric in [*_metric_for(setting), "pc_triplet_agreement"]:
        key = f"test_{metric}"
        others = {m: s[key] for m, s in rows.items() if m not in ("pc", "scratch")}
        if not others:
            continue
        pc = rows["pc"][key]
        rank = 1 + sum(s[key].mean > pc.mean for m, s in rows.items() if m != "pc")
        features = _best({m: s for m, s in others.items() if reads(m) == FEATURES})
        found.append(Comparison(metric, rank, len(rows), pc, features, _best(others)))
    return found


def _best(stats: dict[str, Stat]) -> Best | None:
    top = max(stats, key=lambda m: stats[m].mean, default=None)
    return None if top is None else Best(top, stats[top])


def _against(c: Comparison, best: Best | None) -> str:
    return "—" if best is None else f"{best.method} {best.stat}: {verdict(c.pc, best.stat)}"


def reading(records: list[Record], pair: str, setting: str) -> list[str]:
    return [
        f"- test {c.metric}: PC ({c.pc}) ranks {c.rank} of {c.methods}; against the best "
        f"feature-only baseline {_against(c, c.feature_only)}; against the best of any signal "
        f"{_against(c, c.overall)}."
        for c in compare(records, pair, setting)
    ]


def _tally(verdicts: list[tuple[Stat, Stat]]) -> str:
    words = Counter(outcome(pc, other) for pc, other in verdicts)
    single = f"; {words['one seed']} have one seed" if words["one seed"] else ""
    return (f"wins {words['wins']}, ties {words['tie']} and loses {words['loses']} of "
            f"{len(verdicts)} verdicts{single}")  # fmt: skip


def summary_table(study: Study, records: list[Record], pairs: list[str]) -> str:
    """Every verdict of the report in one table, against the best feature-only baseline (the
    headline) and against the best baseline of any signal, and their tallies per grouping."""
    found = [(pair, setting, c) for pair, setting in itertools.product(pairs, study.settings)
             for c in compare(records, pair, setting)]  # fmt: skip
    if not found:
        return ""
    lines = ["| pair · setting | test metric | PC | PC rank | best feature-only baseline | "
             "verdict | best of any signal | verdict |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for pair, setting, c in found:
        cells = [f"{pair} · {setting.replace('_', '-')}", c.metric, str(c.pc),
                 f"{c.rank} of {c.methods}"]  # fmt: skip
        for best in (c.feature_only, c.overall):
            cells += ["—", "—"] if best is None else [
                f"{best.method} {best.stat}", verdict(c.pc, best.stat)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for setting in study.settings:
        mine = [c for _, s, c in found if s == setting]
        if not mine:
            continue
        name = setting.replace("_", "-")
        features = [(c.pc, c.feature_only.stat) for c in mine if c.feature_only]
        lines.append(f"- {name}: against the best feature-only baseline PC "
                     f"{_tally(features)}; against the best of any signal PC "
                     f"{_tally([(c.pc, c.overall.stat) for c in mine])}.")  # fmt: skip
    return "\n".join(lines)


def deploy_table(records: list[Record]) -> str:
    deployed = [r for r in records if r.phase == "deploy"]
    if not deployed:
        return ""
    rows = summarise(deployed, "validate")
    head = ["method", "fp32 top-1 (onnxruntime)", "int8 top-1", "int8 drop (points)",
            "fp32 triplet", "int8 triplet", "int8 p50 ms (1 thread)", "int8 MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in rows.items():
        drop = s["int8_drop_points"]
        cells = [method, str(s["fp32_test_top1"]), str(s["int8_test_top1"]),
                 f"{drop.mean:.2f} ± {drop.std:.2f}", str(s["fp32_test_pc_triplet_agreement"]),
                 str(s["int8_test_pc_triplet_agreement"]), f"{s['int8_p50_ms_1t'].mean:.3f}",
                 f"{s['int8_size_mb'].mean:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    other = next((m for m in rows if m != "pc"), None)
    if "pc" in rows and other:  # does PC's standing survive quantization?
        lines.append("")
        for key, what, lower in (("int8_test_top1", "int8 top-1", False),
                                 ("int8_drop_points", "top-1 lost through int8 (fraction)", True),
                                 ("int8_test_pc_triplet_agreement", "int8 triplet agreement",
                                  False)):  # fmt: skip
            pc, base = (_fraction(rows[m][key]) if lower else rows[m][key] for m in ("pc", other))
            lines.append(f"- {what}: PC ({pc}) against {other} ({base}) "
                         f"{verdict(pc, base, lower)}.")  # fmt: skip
    return "\n".join(lines)


def _fraction(points: Stat) -> Stat:
    return Stat(points.mean / 100, points.std / 100, points.n)


def _figure(study: Study, pairs: list[str]) -> tuple[plt.Figure, list]:
    """A row of panels, one per pair and setting: the figure and [(axes, (pair, setting))]."""
    panels = [(p, s) for p in pairs for s in study.settings]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    return fig, list(zip(axes[0], panels, strict=True))


def plot_accuracy(study: Study, records: list[Record], pairs: list[str], path: Path) -> None:
    """Test accuracy by method with seed error bars: one panel per pair and setting."""
    fig, panels = _figure(study, pairs)
    for ax, (pair, setting) in panels:
        rows = summarise(final_records(records, pair, setting))
        methods = [m for m in study.methods if m in rows]
        for i, metric in enumerate(_metric_for(setting)):
            means = [rows[m][f"test_{metric}"].mean for m in methods]
            stds = [rows[m][f"test_{metric}"].std for m in methods]
            xs = [j + 0.2 * (i - 1) for j in range(len(methods))]
            ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, label=metric)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
        ax.set_title(f"{pair}\n{setting}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    panels[0][0].set_ylabel("test accuracy (mean ± std over seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_coherence(study: Study, records: list[Record], pairs: list[str], path: Path) -> None:
    """pc_triplet_agreement against accuracy across methods: one panel per pair and setting."""
    fig, panels = _figure(study, pairs)
    for ax, (pair, setting) in panels:
        rows = summarise(final_records(records, pair, setting))
        metric = "top1" if setting == "class_aware" else "knn_top1"
        for method, s in rows.items():
            x, y = s["test_pc_triplet_agreement"], s[f"test_{metric}"]
            ax.errorbar(x.mean, y.mean, xerr=x.std, yerr=y.std, fmt="o", capsize=2)
            ax.annotate(method, (x.mean, y.mean), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel("test pc_triplet_agreement vs teacher")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{pair} · {setting}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def loss_cost_table(methods: list[str]) -> str:
    """Forward + backward of each loss of ``methods`` (and PC's plain reference) at B = 128 on
    every device benchmarks/results has."""
    paths = [Path("benchmarks") / "results" / f"loss_cost{s}.json" for s in ("", "_cuda")]
    reports = [json.loads(path.read_text()) for path in paths if path.is_file()]
    if not reports:
        return "(no benchmarks/results/loss_cost.json: run `python benchmarks/loss_cost.py`)"
    at_128 = [
        {p["loss"]: p for p in r["points"] if p["batch"] == 128 and p["seconds"] is not None}
        for r in reports
    ]
    shown = [*(m for m in methods if m != "scratch"), "pc_reference"]
    measured = [loss for points in at_128 for loss in points if loss in shown]
    losses = list(dict.fromkeys([*measured, *shown]))  # unmeasured ones too, as "—"
    columns = " | ".join(f"{r['device_name']}: ms / peak extra MiB" for r in reports)
    lines = [f"| loss | {columns} |", "|---|" + "---|" * len(reports)]
    for loss in losses:
        cells = [
            f"{1000 * p[loss]['seconds']:.1f} / {p[loss]['peak_mib']:.0f}" if loss in p else "—"
            for p in at_128
        ]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [
        f"- {r['device_name']}, {r['threads']} threads, median of {r['repeats']}: `{r['command']}`"
        for r in reports
    ]
    lines.append(
        "- Forward + backward at B = 128. On a GPU a batch this small is bound by "
        "kernel launches; `benchmarks/results/loss_cost*.md` have B = 64 to 2048."
    )
    if any(loss not in p for p in at_128 for loss in losses):
        lines.append("- —: not measured on that device yet (its file predates the loss).")
    return "\n".join(lines)


def _gaps(missing: list[Run]) -> list[str]:
    """``pair setting (method, method, …)`` for each pair and setting with a missing run."""
    by_block: dict[str, list[str]] = {}
    for run in missing:
        kind = " int8" if run.deploy else ""
        block = f"{run.pair} {run.setting.replace('_', '-')}{kind}"
        by_block.setdefault(block, []).append(run.method)
    return [f"{block} ({', '.join(methods)})" for block, methods in by_block.items()]


def report(
    study: Study,
    records: list[Record],
    pairs: list[str],
    out: Path,
    command: str,
    wall: float,
    devices: Mapping[str, int],
    missing: list[Run] | None = None,
) -> str:
    figures = out.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    plot_accuracy(study, records, pairs, figures / f"{study.name}-accuracy.png")
    plot_coherence(study, records, pairs, figures / f"{study.name}-coherence.png")
    runs = {r.run: r.metrics for r in records}  # a chosen trial's first seed is one run
    compute = sum(v for m in runs.values() for k, v in m.items() if k.endswith(".seconds"))
    seeds = ", ".join(map(str, study.seeds))
    lines = [
        f"# {study.name}: perception coherence against the baselines",
        "",
        f"Generated by `{command}` (never edit by hand) on {datetime.now(UTC):%Y-%m-%d} · "
        f"{cpu_name()} · torch {torch.__version__} · edgepc {__version__} "
        f"(commit {git_commit()[:10]}).",
        "",
        f"- {len(runs)} pipeline runs (tuning, seeds {seeds}, int8); their training and evaluation "
        f"took {compute / 3600:.2f} h of compute when they ran; this invocation took "
        f"{wall / 60:.1f} min.",
        "- Runs trained on (the `edgepc.device` tag of each): "
        + ", ".join(f"{device} ({n} runs)" for device, n in sorted(devices.items()))
        + ".",
        f"- Every run is the `{study.pipeline}` pipeline up to its distill stage with the pair's "
        "overrides: same teacher, student, split, epochs, optimiser, schedule and augmentation; "
        "only the transfer loss (and its tuned value) differs. Runs are in MLflow with the tag "
        f"`edgepc.study = {study.name}`; their metrics are in `{out.with_suffix('.json').name}`, "
        "from which this report regenerates without MLflow.",
        "- **class-unaware**: α = 0, the transfer loss alone; quality by kNN top-1 (k = 5, "
        "cosine), a linear probe (L-BFGS on the frozen embeddings of the whole train split) "
        "and pc_* against the teacher. `scratch` is the labelled reference (CE only).",
        "- **class-aware**: α = 1, CE + weight · transfer loss; top-1 of the student's head.",
        "- **What each method reads** besides the images: *feature-only* methods the teacher's "
        f"embeddings ({', '.join(m for m in study.methods if reads(m) == FEATURES)}); "
        f"*teacher logits* methods its class scores "
        f"({', '.join(m for m in study.methods if reads(m) == LOGITS)}: a class signal even at "
        "α = 0). PC's verdicts are given against the best feature-only baseline (the headline: "
        "methods that read what PC reads) and, beside it, against the best baseline of any "
        "signal.",
        "- Tuning: each method gets the same grid on the first seed; the trial with the best "
        "validation metric is then trained with every seed. Test-split mean ± sample std over "
        "seeds. Verdicts: |Δ| ≤ 2 standard errors of the difference is a tie.",
        "",
        "- **Incomplete**: the store does not hold every run yet of "
        + "; ".join(_gaps(missing))
        + ". Such a method has no row in its table below (its done trials are in the grid), "
        "and the int8 rows wait for their method's runs."
        if missing
        else "",
        "",
        "## Summary: PC against the best feature-only baseline, and the best of any signal",
        "",
        summary_table(study, records, pairs) or "(no pair has every seed of PC and a baseline)",
        "",
        *_variants_line(out),
        f"![accuracy by method](results/{study.name}-accuracy.png)",
        "",
        f"![coherence against accuracy](results/{study.name}-coherence.png)",
        "",
    ]
    for pair in pairs:
        spec = study.pairs[pair]
        teacher = next((r.metrics for r in records if r.run.pair == pair), {})
        lines += [
            f"## {spec.title}",
            "",
            f"Teacher test top-1 {teacher.get('teacher.test_top1', float('nan')):.4f}, kNN top-1 "
            f"{teacher.get('teacher.test_knn_top1', float('nan')):.4f}"
            + (f" (committed weights `{spec.teacher}`)" if spec.teacher else "")
            + ". Overrides: "
            + ", ".join(f"`{o}`" for o in spec.overrides),
            "",
        ]
        for setting, setting_spec in study.settings.items():
            ((knob, values),) = setting_spec.grid.items()
            lines += [
                f"### {pair} · {setting.replace('_', '-')}",
                "",
                method_table(study, records, pair, setting),
                "",
                *reading(records, pair, setting),
                "",
                f"<details><summary>grid: {knob} ∈ {values}</summary>",
                "",
                grid_table(records, pair, setting, setting_spec.select),
                "",
                "</details>",
                "",
            ]
    table = deploy_table(records)
    if table and study.deploy:
        lines += [
            f"## Deployed int8 ({study.deploy.pair}, class-aware, {study.pipeline} target)",
            "",
            "PC against the baseline with the best mean validation top-1, each seed through "
            "coherence-keeping QAT, export and validation in onnxruntime on the test split. "
            "Overrides: " + ", ".join(f"`{o}`" for o in study.deploy.overrides),
            "",
            table,
            "",
        ]
    lines += ["## Cost per training step of each loss", "", loss_cost_table(study.methods), ""]
    lines += ["`train img/s` in the tables above is the whole training step of each run.", ""]
    return "\n".join(lines)


def _variants_line(out: Path) -> list[str]:
    """A pointer to the formulation study when it sits beside this report."""
    variants = out.parent / "results" / "pc_variants.md"
    if not variants.is_file():
        return []
    link = "[results/pc_variants.md](results/pc_variants.md)"
    return ["Which formulation of PC to run (τ, hard teacher, cosine, batch, neighbourhood "
            "weighting, a queue of references; chosen on the validation split, with matched "
            f"trials for the strongest baselines): {link}.", ""]  # fmt: skip
