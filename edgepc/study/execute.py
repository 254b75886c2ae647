"""Running the study's runs: read back from the committed records or MLflow, or trained (in
this process, or in worker processes with ``--jobs``)."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from edgepc.errors import EdgepcError
from edgepc.pipelines.config import ConfigError
from edgepc.pipelines.runner import run_pipeline
from edgepc.study.protocol import (
    MissingRunError,
    Run,
    Study,
    deploy_plan,
    last_stage,
    plan,
    run_config,
)
from edgepc.tracking import Tracker


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
            until=last_stage(run), tags=tags,
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
