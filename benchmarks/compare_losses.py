"""The comparison study: perception coherence against the baselines, under one protocol.

    python benchmarks/compare_losses.py                     # configs/study.yaml → RESULTS.md
    python benchmarks/compare_losses.py --pairs mnist-tiny  # one pair (the report holds all done)
    python benchmarks/compare_losses.py --jobs 2             # two processes, a core each
    python benchmarks/compare_losses.py --profile smoke --out /tmp/study/RESULTS.md   # CI

Every run is an ordinary pipeline run up to the distill stage (the deployed int8 rows: up to
validate) in the MLflow store, tagged ``edgepc.study``. For each pair, setting and method, the
trials of the grid are trained with the first seed and the best on the validation split is
trained with every seed; the report shows test-split mean ± std. A run whose config (cache key)
is already in the store is read back, not retrained: a rerun regenerates the report in seconds
and trains only what changed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Literal

import matplotlib
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from edgepc import __version__
from edgepc.distill.losses import loss_class, loss_names
from edgepc.errors import EdgepcError
from edgepc.files import save_figure, write_text
from edgepc.hardware import cpu_name
from edgepc.pipelines.config import CONFIGS, ConfigError, PipelineConfig, load_config
from edgepc.pipelines.runner import default_cache, run_pipeline, stage_keys
from edgepc.tracking import Tracker, git_commit

ROOT = Path(__file__).resolve().parents[1]
Setting = Literal["class_unaware", "class_aware"]
SELECTS = ("top1", "knn_top1", "probe_top1")
TEST_METRICS = ("top1", "knn_top1", "probe_top1", "pc_triplet_agreement", "pc_spearman")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SettingSpec(_Strict):
    alpha: float = Field(ge=0)
    select: Literal["top1", "knn_top1", "probe_top1"]
    grid: dict[str, list[float]] = Field(min_length=1, max_length=1)  # one knob: its values


class Pair(_Strict):
    title: str
    overrides: list[str]
    # A committed teacher state dict (path from the repository root) loaded instead of training
    # one: a teacher trained again on another machine type differs in its last digits.
    teacher: str | None = None


class Variant(_Strict):
    """A named formulation of a registered loss: the method's runs plus these overrides."""

    loss: str
    overrides: list[str] = Field(min_length=1)


class Deploy(_Strict):
    pair: str
    overrides: list[str] = []


class Study(_Strict):
    name: str
    pipeline: str = "cpu"
    seeds: list[int] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    settings: dict[Setting, SettingSpec] = Field(min_length=1)
    pairs: dict[str, Pair] = Field(min_length=1)
    deploy: Deploy | None = None
    variants: dict[str, Variant] = {}

    @model_validator(mode="after")
    def _known(self) -> Study:
        for method in self.methods:
            if self.loss_of(method) not in ("scratch", *loss_names()):
                raise ValueError(
                    f"method {method!r} is neither scratch, a registered loss nor a variant"
                )
        if self.deploy and self.deploy.pair not in self.pairs:
            raise ValueError(f"deploy.pair {self.deploy.pair!r} is not one of the pairs")
        return self

    def loss_of(self, method: str) -> str:
        """The registered loss (or scratch) that ``method`` runs: itself or its variant's."""
        return self.variants[method].loss if method in self.variants else method


def load_study(path: Path, profile: str | None = None) -> Study:
    """The study config, with a profile's top-level keys replacing the file's."""
    try:
        raw = yaml.safe_load(path.read_text())
        profiles = raw.pop("profiles", {}) or {}
        if profile is not None:
            if profile not in profiles:
                raise ConfigError(f"profile {profile!r} is not in {path.name}: {list(profiles)}")
            raw |= profiles[profile]
        return Study.model_validate(raw)
    except (OSError, yaml.YAMLError, AttributeError) as error:
        raise ConfigError(f"cannot read study config {path}: {error}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path.name}: {where}: {first['msg']}") from None


@dataclass(frozen=True)
class Run:
    """One pipeline run of the study: which pair, setting, method, trial value and seed."""

    pair: str
    setting: str
    method: str
    knob: str
    value: float | None  # None: the method has no value on this knob (scratch's weight)
    seed: int
    deploy: bool = False

    def overrides(self, study: Study) -> list[str]:
        spec = study.settings[self.setting]
        train, name = "distill.train", study.loss_of(self.method)
        if name == "scratch":  # labels only, in both settings: the reference row
            loss = [f"{train}.alpha=1.0", f"{train}.beta=0", f"{train}.baselines={{}}"]
        elif name == "pc":
            loss = [f"{train}.alpha={spec.alpha}", f"{train}.baselines={{}}", f"{train}.beta=1.0"]
        else:
            loss = [f"{train}.alpha={spec.alpha}", f"{train}.beta=0",
                    f"{train}.baselines={{{name}: {{weight: 1.0}}}}"]  # fmt: skip
        variant = study.variants[self.method].overrides if self.method in study.variants else []
        trial = []
        if self.value is not None:
            if self.knob != "weight":
                trial = [f"{self.knob}={self.value}"]
            elif name == "pc":
                trial = [f"{train}.beta={self.value}"]
            else:
                trial = [f"{train}.baselines={{{name}: {{weight: {self.value}}}}}"]
        deploy = study.deploy.overrides if self.deploy and study.deploy else []
        pair = study.pairs[self.pair]
        teacher = [f"teacher.checkpoint={ROOT / pair.teacher}"] if pair.teacher else []
        return [*pair.overrides, *teacher, *loss, *variant, *trial, f"distill.seed={self.seed}",
                *deploy]  # fmt: skip

    @property
    def label(self) -> str:
        value = "" if self.value is None else f" {self.knob.split('.')[-1]}={self.value:g}"
        kind = " int8" if self.deploy else ""
        return f"{self.pair} {self.setting} {self.method}{value} seed {self.seed}{kind}"


def trials(study: Study, pair: str, setting: str, method: str, seed: int) -> list[Run]:
    """The grid of one method (scratch has no loss weight: one trial on a weight grid)."""
    ((knob, values),) = study.settings[setting].grid.items()
    if method == "scratch" and knob == "weight":
        return [Run(pair, setting, method, knob, None, seed)]
    return [Run(pair, setting, method, knob, v, seed) for v in values]


class MissingRunError(Exception):
    """A run the store does not hold, met in read-only mode."""


def _last_stage(run: Run) -> str:
    return "validate" if run.deploy else "distill"


def run_config(study: Study, run: Run) -> tuple[PipelineConfig, str, str]:
    """A study run's pipeline config and the cache keys of its teacher and of its last stage:
    equal keys, equal computation (config, code version and data)."""
    config = load_config(study.pipeline, overrides=run.overrides(study))
    keys = stage_keys(config)
    return config, keys["teacher"], keys[_last_stage(run)]


@dataclass(frozen=True)
class Recorded:
    """What a committed records file (docs/RESULTS.json) holds, by each run's last-stage key."""

    metrics: dict[str, dict[str, float]]  # by key
    teachers: dict[str, float]  # teacher key -> the teacher's test top-1
    device: str  # where the recorded runs trained
    entries: list[tuple[str, dict]]  # each record as written, with its key

    @classmethod
    def none(cls) -> Recorded:
        return cls({}, {}, "recorded", [])

    @classmethod
    def read(cls, path: Path) -> Recorded:
        """The records of ``path`` (none if it does not exist), keyed with the study config they
        were made with."""
        if not path.exists():
            return cls.none()
        try:
            raw = json.loads(path.read_text())
            study = Study.model_validate(raw["study"])
            metrics, teachers, entries = {}, {}, []
            for record in [*raw["records"], *raw.get("kept", [])]:
                _, teacher, key = run_config(study, Run(**record["run"]))
                metrics[key] = record["metrics"]
                teachers[teacher] = record["metrics"]["teacher.test_top1"]
                entries.append((key, record))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"cannot read the study records {path}: {error}") from None
        devices = list(raw.get("devices", {}))
        device = devices[0] if len(devices) == 1 else "recorded"
        return cls(metrics, teachers, device, entries)


class TeacherMismatchError(EdgepcError):
    """A teacher trained again here differs from the one the records were made with."""


class Executor:
    """Runs (or reads back from the committed records or MLflow) the pipeline of a study run;
    counts what it trained, and on which device each run trained. ``read_only``: never train,
    raise :class:`MissingRunError` instead."""

    def __init__(
        self, study: Study, tracker: Tracker, cache: Path, read_only: bool, recorded: Recorded
    ) -> None:
        self.study, self.tracker, self.cache, self.read_only = study, tracker, cache, read_only
        self.recorded = recorded
        self.trained = self.reused = 0
        self.devices: Counter[str] = Counter()
        self.keys: set[str] = set()  # of every run this invocation met
        self.fresh: dict[str, str] = {}  # key -> device of each run trained by this process
        self.by_workers: dict[str, str] = {}  # the same, of this invocation's --jobs workers

    def __call__(self, run: Run) -> dict[str, float]:
        config, teacher, key = run_config(self.study, run)
        self.keys.add(key)
        if key in self.recorded.metrics:
            self.reused += 1
            self.devices[self.recorded.device] += 1
            return self.recorded.metrics[key]
        tags = {"edgepc.study": self.study.name, "edgepc.study.key": key}
        found = self.tracker.runs.search({**tags, "edgepc.kind": "pipeline"}, finished=True)
        if found:
            if key in self.by_workers:
                self.trained += 1
            else:
                self.reused += 1
            self.devices[found[0]["tags"].get("edgepc.device", "unrecorded")] += 1
            return found[0]["metrics"]
        if self.read_only:
            raise MissingRunError(run)
        tags |= {f"edgepc.study.{k}": str(v) for k, v in asdict(run).items()}
        report = run_pipeline(
            config, self.cache, self.tracker, progress=False, echo=lambda _: None,
            until=_last_stage(run), tags=tags,
        )  # fmt: skip
        self.trained += 1
        self.devices[report.device] += 1
        self.fresh[key] = report.device
        metrics = {f"{s.stage}.{k}": v for s in report.stages for k, v in s.metrics.items()}
        self._same_teacher(teacher, metrics["teacher.test_top1"])
        return metrics | {f"{s.stage}.seconds": s.seconds for s in report.stages}

    def _same_teacher(self, key: str, top1: float) -> None:
        """New rows are comparable with recorded ones only if their teacher is the same: it is
        rebuilt deterministically from the same config, and must score what it scored then."""
        recorded = self.recorded.teachers.get(key)
        if recorded is not None and recorded != top1:
            raise TeacherMismatchError(
                f"the teacher trained here scores test top-1 {top1:.4f}, the records were made "
                f"with one that scored {recorded:.4f} (cache key {key[:12]}): new rows would be "
                "compared against another teacher; train the study again from scratch "
                "(--records none) or on the machine type the records name"
            )

    def kept(self) -> list[dict]:
        """The recorded runs this invocation did not meet (another pair, method or grid), kept
        in the records it writes so that a partial invocation loses nothing."""
        return [record for key, record in self.recorded.entries if key not in self.keys]


Execute = Callable[[Run], dict[str, float]]  # an Executor, or a stand-in that only notes runs


@dataclass
class Record:
    run: Run
    phase: str  # tune | final | deploy
    metrics: dict[str, float]


def plan(
    study: Study, pairs: list[str], execute: Execute, missing: list[Run] | None = None
) -> Iterator[Record]:
    """Tune on the first seed, then every seed at the chosen trial. In read-only mode a method
    whose runs the store lacks gets no final rows (its done trials stay) and its first missing
    run goes to ``missing``; the other methods go on."""
    first, *others = study.seeds
    for pair, (setting, spec), method in itertools.product(
        pairs, study.settings.items(), study.methods
    ):
        with _gap(missing):
            tuned = []
            for run in trials(study, pair, setting, method, first):
                tuned.append(Record(run, "tune", execute(run)))
                yield tuned[-1]
            best = choose(tuned, spec.select)
            final = [Record(best.run, "final", best.metrics)]
            for seed in others:
                run = Run(pair, setting, method, best.run.knob, best.run.value, seed)
                final.append(Record(run, "final", execute(run)))
            yield from final  # all seeds or none


@contextmanager
def _gap(missing: list[Run] | None) -> Iterator[None]:
    """Note a run the store lacks (read-only mode) in ``missing`` and go on; without a list the
    gap is an error."""
    try:
        yield
    except MissingRunError as gap:
        if missing is None:
            raise
        missing.append(gap.args[0])


def choose(tuned: list[Record], select: str) -> Record:
    """The trial with the highest validation ``select`` metric (the first on ties)."""
    return max(tuned, key=lambda r: r.metrics[f"distill.val_{select}"])


def deploy_plan(
    study: Study, records: list[Record], execute: Execute, missing: list[Run] | None = None
) -> Iterator[Record]:
    """PC and the baseline with the best mean validation top-1, class-aware, every seed, int8."""
    if study.deploy is None or "class_aware" not in study.settings:
        return
    final = _final(records, study.deploy.pair, "class_aware")
    rows = summarise(final)
    baselines = [m for m in rows if m not in ("pc", "scratch")]
    if "pc" not in rows or not baselines:
        return
    best = max(baselines, key=lambda m: rows[m]["val_top1"].mean)
    for method in ("pc", best):
        with _gap(missing):
            mine = [r.run for r in final if r.run.method == method]
            runs = [Run(**{**asdict(run), "deploy": True}) for run in mine]
            deployed = [Record(run, "deploy", execute(run)) for run in runs]
            yield from deployed  # all seeds or none


def _work(
    study: Study, recorded: Recorded, cache: Path, uri: str | None, threads: int,
    task: tuple[str, str, str] | Run,
) -> dict[str, str]:  # fmt: skip
    """One task of a ``--jobs`` worker process: a method's runs of one pair and setting (its
    grid, then every seed of the chosen trial) or one int8 run. Returns the key and device of
    each run it trained."""
    torch.set_num_threads(threads)
    execute = Executor(study, Tracker(uri), cache, False, recorded)
    if isinstance(task, Run):
        execute(task)
    else:
        pair, setting, method = task
        one = study.model_copy(
            update={"methods": [method], "settings": {setting: study.settings[setting]}}
        )
        for _ in plan(one, [pair], execute):
            pass
    return execute.fresh


def train_in_parallel(
    study: Study, pairs: list[str], execute: Executor, jobs: int, uri: str | None
) -> None:
    """Train what the study lacks in ``jobs`` worker processes (the cores split evenly between
    them): every method of every pair and setting, then the int8 runs. The caller's own pass
    then reads every run back, and counts those the workers trained as trained."""
    if str(Path(__file__).parent) not in sys.path:  # a worker imports this file by its name
        sys.path.append(str(Path(__file__).parent))
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    work = partial(_work, study, execute.recorded, execute.cache, uri, threads)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:

        def gather(tasks: list, unit: str) -> None:
            futures = [pool.submit(work, task) for task in tasks]
            with tqdm(total=len(futures), desc=f"{study.name} ({jobs} jobs)", unit=unit) as bar:
                for future in as_completed(futures):
                    try:
                        execute.by_workers |= future.result()
                    except BaseException:
                        pool.shutdown(cancel_futures=True)
                        raise
                    bar.update()

        gather(list(itertools.product(pairs, study.settings, study.methods)), "method")
        if study.deploy:  # which int8 runs: from the runs just trained
            done = Executor(study, execute.tracker, execute.cache, True, execute.recorded)
            records = list(plan(study, pairs, done, missing=[]))
            runs: list[Run] = []
            list(deploy_plan(study, records, lambda run: runs.append(run) or {}))
            gather(runs, "int8 run")


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}" if self.n > 1 else f"{self.mean:.4f}"

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, len(values))


def summarise(final: list[Record], stage: str = "distill") -> dict[str, dict[str, Stat]]:
    """Per method: each metric over seeds (val_*, test_*, train_images_per_s)."""
    by_method: dict[str, list[dict[str, float]]] = {}
    for record in final:
        by_method.setdefault(record.run.method, []).append(record.metrics)
    prefix = f"{stage}."
    return {
        method: {
            key[len(prefix) :]: Stat.of([m[key] for m in runs])
            for key in runs[0]
            if key.startswith(prefix) and all(key in m for m in runs)
        }
        for method, runs in by_method.items()
    }


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
    final = _final(records, pair, setting)
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
    rows = summarise(_final(records, pair, setting))
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


def _final(records: list[Record], pair: str, setting: str) -> list[Record]:
    return [r for r in records
            if r.phase == "final" and (r.run.pair, r.run.setting) == (pair, setting)]  # fmt: skip


def _figure(study: Study, pairs: list[str]) -> tuple[plt.Figure, list]:
    """A row of panels, one per pair and setting: the figure and [(axes, (pair, setting))]."""
    panels = [(p, s) for p in pairs for s in study.settings]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    return fig, list(zip(axes[0], panels, strict=True))


def plot_accuracy(study: Study, records: list[Record], pairs: list[str], path: Path) -> None:
    """Test accuracy by method with seed error bars: one panel per pair and setting."""
    fig, panels = _figure(study, pairs)
    for ax, (pair, setting) in panels:
        rows = summarise(_final(records, pair, setting))
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
        rows = summarise(_final(records, pair, setting))
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
    paths = [ROOT / "benchmarks" / "results" / f"loss_cost{s}.json" for s in ("", "_cuda")]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIGS / "study.yaml")
    parser.add_argument("--profile", help="a profile of the study config (smoke)")
    parser.add_argument("--pairs", nargs="+", help="train only these pairs (default: all)")
    parser.add_argument(
        "--methods", nargs="+",
        help="train only these methods (default: all); e.g. split a pair across processes",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--cache", type=Path, default=None, help=f"default {default_cache()}")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the project's)")
    parser.add_argument(
        "--report-only", action="store_true",
        help="train nothing: report what the store holds (a method with a missing run: no row)",
    )  # fmt: skip
    parser.add_argument(
        "--records", type=Path,
        help="committed records to read runs back from (default: --out with .json; none: "
        "read only MLflow)",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="train in this many processes, the cores split between them (default 1)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        study = load_study(args.config, args.profile)
        pairs = args.pairs or list(study.pairs)
        unknown = sorted(set(pairs) - set(study.pairs))
        if unknown:
            raise ConfigError(f"unknown pairs {unknown}; the study has {list(study.pairs)}")
        if args.methods:
            unknown = sorted(set(args.methods) - set(study.methods))
            if unknown:
                raise ConfigError(f"unknown methods {unknown}; the study has {study.methods}")
            study = study.model_copy(update={"methods": args.methods})
        tracker = Tracker(args.tracking_uri)
        records_path = args.records or args.out.with_suffix(".json")
        recorded = Recorded.read(records_path) if str(args.records) != "none" else Recorded.none()
        execute = Executor(study, tracker, args.cache or default_cache(), args.report_only,
                           recorded)  # fmt: skip
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: give 1 or more processes")
        if args.jobs > 1 and not args.report_only:
            train_in_parallel(study, pairs, execute, args.jobs, args.tracking_uri)
        records: list[Record] = []
        missing: list[Run] = []  # read-only mode: the first missing run of each method
        bar = tqdm(desc=study.name, unit="run")
        for record in plan(study, pairs, execute, missing):
            records.append(record)
            bar.set_postfix_str(record.run.label)
            bar.update()
        records += list(deploy_plan(study, records, execute, missing))
        bar.close()
    except (EdgepcError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "python benchmarks/compare_losses.py " + " ".join(argv or sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = report(study, records, pairs, args.out, command.strip(),
                  time.perf_counter() - started, execute.devices, missing)  # fmt: skip
    write_text(args.out, text)
    raw = {"study": study.model_dump(), "python": platform.python_version(),
           "trained": execute.trained, "reused": execute.reused, "devices": execute.devices,
           "records": [{"run": asdict(r.run), "phase": r.phase, "metrics": r.metrics}
                       for r in records],
           "kept": execute.kept()}  # fmt: skip
    write_text(args.out.with_suffix(".json"), json.dumps(raw, indent=1))
    print(
        f"{execute.trained} runs trained, {execute.reused} read back from the records or "
        f"MLflow; {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
