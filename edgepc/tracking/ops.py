"""The write operations on a store, on explicit run ids: the tracker calls them, and the sync
replays them from a spool. Each takes ``(client, uri, **args)``; ``args`` are JSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgepc.tracking.registry import register
from edgepc.tracking.store import open_store

PARENT_TAG = "mlflow.parentRunId"


def now() -> int:
    return int(time.time() * 1000)


def create_run(client: Any, uri: str, experiment: str, name: str, tags: dict, start: int,
               parent: str | None = None) -> str:  # fmt: skip
    tags = {**tags, PARENT_TAG: parent} if parent else tags
    found = client.get_experiment_by_name(experiment)  # missing: a sync into a new store
    exp_id = found.experiment_id if found is not None else open_store(uri, experiment)[1]
    return client.create_run(exp_id, start, tags, run_name=name).info.run_id


def log(client: Any, uri: str, run: str, metrics: list | None = None,
        params: dict | None = None, tags: dict | None = None) -> None:  # fmt: skip
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(
        run,
        metrics=[Metric(k, v, t, step) for k, v, t, step in metrics or []],
        params=[Param(k, v) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
    )


def log_dict(client: Any, uri: str, run: str, data: dict, filename: str) -> None:
    client.log_dict(run, data, filename)


def log_artifact(client: Any, uri: str, run: str, path: str, folder: str | None) -> None:
    (client.log_artifacts if Path(path).is_dir() else client.log_artifact)(run, path, folder)


def end_run(client: Any, uri: str, run: str, status: str, end: int) -> None:
    client.set_terminated(run, status, end)


OPS = {"create_run": create_run, "log": log, "log_dict": log_dict,
       "log_artifact": log_artifact, "end_run": end_run, "register": register}  # fmt: skip
