"""The study's protocol: its config (pairs, settings, methods, seeds), the runs it makes, and
the plan that tunes each method on the first seed and repeats the chosen trial on every seed."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgepc.distill.losses import loss_names
from edgepc.pipelines.config import PipelineConfig, load_config, load_yaml
from edgepc.pipelines.runner import stage_keys

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
    """The study config, with a profile's top-level keys replacing the file's (the pipeline's
    loader, :func:`edgepc.pipelines.config.load_yaml`)."""
    return load_yaml(Study, path, profile)


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
        teacher = [f"teacher.checkpoint={Path(pair.teacher).resolve()}"] if pair.teacher else []
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


def last_stage(run: Run) -> str:
    return "validate" if run.deploy else "distill"


def run_config(study: Study, run: Run) -> tuple[PipelineConfig, str, str]:
    """A study run's pipeline config and the cache keys of its teacher and of its last stage:
    equal keys, equal computation (config, code version and data)."""
    config = load_config(study.pipeline, overrides=run.overrides(study))
    keys = stage_keys(config)
    return config, keys["teacher"], keys[last_stage(run)]


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
    final = final_records(records, study.deploy.pair, "class_aware")
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


def final_records(records: list[Record], pair: str, setting: str) -> list[Record]:
    return [r for r in records
            if r.phase == "final" and (r.run.pair, r.run.setting) == (pair, setting)]  # fmt: skip
