"""The stage graph, its content-hash cache and the MLflow runs around it.

A stage's key is the sha256 of its config sections, the keys of its upstream stages and the
edgepc version: an unchanged stage is skipped, a changed one re-runs with everything after
it. A stage is complete once its ``result.json`` is written (last, atomically); an
interrupted stage keeps its workdir, so a rerun resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgepc import __version__
from edgepc.data.datasets import data_home
from edgepc.distill.distributed import barrier, broadcast, local_device, rank
from edgepc.errors import EdgepcError
from edgepc.files import remove_stale_temporaries, write_text
from edgepc.hardware import describe, pick_device
from edgepc.models.teachers import is_program
from edgepc.pipelines.config import PipelineConfig
from edgepc.pipelines.deploy import export_stage, register_stage, validate_stage
from edgepc.pipelines.stages import (
    DataFacts,
    EmbeddingFacts,
    ExportFacts,
    Facts,
    Output,
    QATFacts,
    RegisterFacts,
    StageContext,
    StageResult,
    ValidateFacts,
    data_stage,
    distill_stage,
    qat_stage,
    teacher_stage,
)
from edgepc.tracking import NoTracking, Tracker, Tracking, flatten, git_commit

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Stage:
    """A stage is called as ``run(*sections, *upstream outputs, ctx)``: the config sections its
    cache key is built from, in this order, then the outputs of its upstream stages."""

    name: str
    run: Callable[..., StageResult]
    facts: type[Facts]  # what it hands downstream besides metrics and files
    sections: tuple[str, ...]  # its config section first, then the top-level keys it reads
    upstream: tuple[str, ...]
    cached: bool = True  # False: runs every time (its effect lives outside the cache)


# Stages that train: every rank of a torchrun takes part (the others run on rank 0 alone).
DATA_PARALLEL = ("teacher", "distill", "qat")
STAGES = (
    Stage("data", data_stage, DataFacts, ("data", "seed"), ()),
    Stage("teacher", teacher_stage, EmbeddingFacts, ("teacher", "seed"), ("data",)),
    Stage("distill", distill_stage, EmbeddingFacts, ("distill", "seed"), ("data", "teacher")),
    Stage("qat", qat_stage, QATFacts, ("qat", "target", "seed"), ("data", "teacher", "distill")),
    Stage(
        "export",
        export_stage,
        ExportFacts,
        ("export", "target"),
        ("data", "teacher", "distill", "qat"),
    ),
    Stage("validate", validate_stage, ValidateFacts, ("validation",), ("distill", "export")),
    Stage(
        "register",
        register_stage,
        RegisterFacts,
        ("registry", "name"),
        ("export", "validate"),
        False,
    ),
)


@dataclass
class StageReport:
    stage: str
    status: str  # ran | cached | failed
    seconds: float
    metrics: dict[str, float]
    run_id: str | None


@dataclass
class PipelineReport:
    name: str
    run_id: str
    tracking_uri: str
    stages: list[StageReport]
    artifacts: str = ""  # the validate stage's table (with the registry's versions)
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # validate: per artifact
    device: str = ""  # where this invocation's stages ran, as hardware.describe names it


def default_cache() -> Path:
    """``$EDGEPC_CACHE``, else ``.edgepc-cache`` in the working directory."""
    env = os.environ.get("EDGEPC_CACHE")
    return Path(env) if env else Path.cwd() / ".edgepc-cache"


# Options added after keys were first recorded: at their default they are left out of the key,
# so that caches and the study's recorded runs stay valid.
KEY_NEUTRAL_DEFAULTS = {
    "recalibrate_bn": False,
    "test_limit": None,
    "neighbourhood": None,
    "queue": None,
    "weight_bits": 8,  # the 8-bit weights every target had before (cpu now defaults to 7)
    "image_size": None,
    "channels": None,
    "in_memory": False,
    "float_layers": [],
    "student_checkpoint": None,
    "channels_last": False,
    "bf16": False,
}


def _key_content(value: object) -> object:
    if not isinstance(value, dict):
        return value
    neutral = KEY_NEUTRAL_DEFAULTS
    return {k: _key_content(v) for k, v in value.items() if k not in neutral or v != neutral[k]}


def _file_digest(path: str) -> str:
    """``sha256:<hex>`` of a file's bytes, or the path itself when it cannot be read (the stage
    that opens it then says what is wrong)."""
    try:
        with open(path, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return path


def stage_key(stage: Stage, config: PipelineConfig, upstream_keys: list[str]) -> str:
    dumped = _key_content(config.model_dump(mode="json"))
    teacher = dumped["teacher"]  # the weights, not where they lie, decide the teacher
    if teacher["checkpoint"]:
        teacher["checkpoint"] = _file_digest(teacher["checkpoint"])
    if is_program(teacher["model"]):
        teacher["model"] = _file_digest(teacher["model"])
    distill = dumped["distill"]
    if distill.get("student_checkpoint"):
        distill["student_checkpoint"] = _file_digest(distill["student_checkpoint"])
    content = {
        "stage": stage.name,
        "config": {s: dumped[s] for s in stage.sections},
        "upstream": upstream_keys,
        "edgepc": __version__,
        # Where datasets are looked for first: another $EDGEPC_DATA may hold other files.
        "data_home": str(data_home()) if stage.name == "data" else None,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def stage_keys(config: PipelineConfig) -> dict[str, str]:
    """Every stage's cache key for ``config``, in order."""
    keys: dict[str, str] = {}
    for stage in STAGES:
        keys[stage.name] = stage_key(stage, config, [keys[u] for u in stage.upstream])
    return keys


def _load_result(stage: Stage, workdir: Path) -> Output | None:
    """The stage's saved result; None when there is none, or when its facts are not the ones
    this edgepc hands downstream (written by an older version): the stage then runs again."""
    path = workdir / "result.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    try:
        facts = stage.facts(**raw["facts"])
    except TypeError:
        return None
    return Output(raw["metrics"], raw["files"], facts, workdir)


def _save_result(workdir: Path, result: StageResult) -> None:
    write_text(workdir / "result.json", json.dumps(asdict(result), indent=2))


def run_pipeline(
    config: PipelineConfig,
    cache: Path | None = None,
    tracker: Tracking | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    until: str | None = None,
    tags: dict[str, str] | None = None,
) -> PipelineReport:
    """Run every stage in order (skipping cached ones) under one tracked parent run, up to and
    including ``until`` (None: all), with ``tags`` added to every run.

    Under ``torchrun`` every rank calls this: rank 0 owns the cache and the tracking (the others
    get :class:`NoTracking`), says which stages run, and the others take part in the training
    stages (in a scratch folder of their own) and read every result from rank 0's cache."""
    stages = _stages(until)
    cache = cache or default_cache()
    if cache.exists() and not cache.is_dir():
        raise EdgepcError(f"the cache {cache} is a file, not a folder: give --cache a folder")
    leader = rank() == 0
    if not leader:
        tracker, progress, echo = NoTracking(), False, lambda _: None
    tracker = tracker or Tracker(on_error=config.tracking.on_error)
    closed = tracker.close_killed_runs()
    if closed:
        echo(f"marked {len(closed)} run(s) of a killed earlier invocation as FAILED")
    device = local_device(pick_device(config.device))
    reports: list[StageReport] = []
    keys = stage_keys(config)
    done: dict[str, Output] = {}
    tags = {"edgepc.target": config.target, "edgepc.git_commit": git_commit(),
            "edgepc.device": describe(device), "edgepc.version": __version__,
            **(tags or {})}  # fmt: skip
    dumped = config.model_dump(mode="json")
    with (
        tracker.run(config.name, {**tags, "edgepc.kind": "pipeline"}) as parent,
        contextlib.ExitStack() as stack,
    ):
        tracker.log_dict(dumped, "config.yaml")
        for stage in stages:
            workdir = cache / f"{stage.name}-{keys[stage.name][:16]}"
            if stage.cached and leader:
                stack.enter_context(_stage_lock(workdir, echo))
            result = _load_result(stage, workdir) if stage.cached and leader else None
            params = flatten({s: dumped[s] for s in stage.sections}, f"{stage.name}.")
            stage_tags = {**tags, "edgepc.stage": stage.name, "edgepc.cache_key": keys[stage.name]}
            if "data" in done:
                stage_tags["edgepc.dataset_fingerprint"] = done["data"].facts.fingerprint
            started = time.perf_counter()
            status = str(broadcast("cached" if result is not None else "ran"))  # rank 0's word
            with tracker.run(stage.name, {**stage_tags, "edgepc.status": status}, params) as rid:
                upstream = [done[u] for u in stage.upstream]
                if status == "ran" and leader:
                    echo(f"[{stage.name}] running in {workdir}")
                    result = _run_stage(stage, config, upstream, workdir, device, tracker,
                                        progress, rid)  # fmt: skip
                elif status == "ran" and stage.name in DATA_PARALLEL:  # a rank > 0 takes part
                    scratch = cache / f".{workdir.name}.rank{rank()}"
                    try:
                        _run_stage(stage, config, upstream, scratch, device, tracker, False, rid)
                    finally:
                        shutil.rmtree(scratch, ignore_errors=True)
                elif leader:
                    echo(f"[{stage.name}] cached: {workdir}")
                if leader:
                    if stage.name == "data":
                        tracker.set_tags({"edgepc.dataset_fingerprint":
                                          result.facts.fingerprint})  # fmt: skip
                    tracker.log_metrics(result.metrics)
            stack.close()  # the result is on disk: release the stage's lock
            barrier()  # ranks > 0 read the result now
            if not leader:
                result = _load_result(stage, workdir)
                if result is None:
                    raise EdgepcError(f"rank 0 left no result for stage {stage.name} in {workdir}")
            done[stage.name] = result
            seconds = time.perf_counter() - started
            reports.append(StageReport(stage.name, status, seconds, result.metrics, rid))
        tracker.log_metrics({f"{r.stage}.{k}": v for r in reports for k, v in r.metrics.items()})
        tracker.log_metrics({f"{r.stage}.seconds": r.seconds for r in reports})
    rows = done["validate"].facts.rows if "validate" in done else {}
    device_name = tags["edgepc.device"]
    return PipelineReport(
        config.name, parent or "", tracker.uri, reports, artifacts_table(done), rows, device_name
    )


def _run_stage(
    stage: Stage,
    config: PipelineConfig,
    upstream: list[Output],
    workdir: Path,
    device: torch.device,
    tracker: Tracking,
    progress: bool,
    run_id: str | None,
) -> Output:
    """One stage in ``workdir`` (resuming what an interrupted run left there): its result saved
    last, its files logged to the stage's run."""
    workdir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(workdir)  # of a run killed in this stage
    log = lambda metrics, step: tracker.log_metrics(metrics, step)  # noqa: E731
    ctx = StageContext(workdir, device, log, progress, run_id, tracker)
    sections = [getattr(config, name) for name in stage.sections]
    try:
        result = stage.run(*sections, *upstream, ctx)
    except BaseException:
        if not any(workdir.iterdir()):  # failed before writing: nothing to resume, no folder
            workdir.rmdir()
        raise
    _save_result(workdir, result)
    for name in result.files.values():
        path = workdir / name
        if path.is_dir() or path.stat().st_size < 64 * 2**20:
            tracker.log_artifact(path, f"{stage.name}/{name}" if path.is_dir() else stage.name)
    return Output(result.metrics, result.files, result.facts, workdir)


@contextlib.contextmanager
def _stage_lock(workdir: Path, echo: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of a stage's cache folder: another pipeline that reaches the same stage
    (same key) waits here, then finds the result cached instead of computing it again."""
    path = workdir.with_name(f".{workdir.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            echo(f"[{workdir.name.split('-')[0]}] waiting: another pipeline (pid {owner}) is "
                 f"running this stage in {workdir}")  # fmt: skip
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stages(until: str | None) -> tuple[Stage, ...]:
    names = [s.name for s in STAGES]
    if until is not None and until not in names:
        raise ValueError(f"until={until!r} is not a stage: {', '.join(names)}")
    return STAGES[: names.index(until) + 1] if until else STAGES


def artifacts_table(done: dict[str, Output]) -> str:
    """Every artifact with its runtime accuracy, coherence, latency and size, and where it is."""
    if "validate" not in done:
        return ""
    table = done["validate"].facts.table
    lines = [table.rstrip(), "", f"bundles: {done['export'].workdir}/<artifact>"]
    if "register" in done:
        facts = done["register"].facts
        aliases = ", ".join(f"@{a} ({'v' if v.isdigit() else ''}{v})"
                            for a, v in facts.versions.items())  # fmt: skip
        lines.append(f"registered as {facts.model}: {aliases}")
    return "\n".join(lines) + "\n"
