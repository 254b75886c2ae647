"""MLflow tracking: the only module of edgepc that imports mlflow.

One parent run per pipeline invocation, one nested run per stage. The default store is
``sqlite:///<project>/mlflow/mlflow.db`` with artifacts in ``<project>/mlflow/artifacts``;
``MLFLOW_TRACKING_URI`` overrides it (e.g. a server).

Every write is one operation (:data:`OPS`) on explicit run ids. When the store fails, the
operation and all later ones go to a spool file (artifacts copied beside it) instead, and
``python -m edgepc.tracking.sync`` replays them in order once the store is back. With
``on_error="spool"`` the pipeline goes on; with ``"stop"`` it stops with one line (what it
could not record is spooled all the same).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from edgepc.errors import EdgepcError

PROJECT = Path(__file__).resolve().parents[2]
STORE = PROJECT / "mlflow"
EXPERIMENT = "edgepc"
PARENT_TAG = "mlflow.parentRunId"
OnError = Literal["spool", "stop"]


class TrackingError(EdgepcError):
    """The MLflow store failed and the pipeline was asked to stop (tracking.on_error=stop)."""


def spool_folder() -> Path:
    """``$EDGEPC_SPOOL``, else ``mlflow-spool`` in the project folder."""
    env = os.environ.get("EDGEPC_SPOOL")
    return Path(env) if env else PROJECT / "mlflow-spool"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the project's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{STORE / 'mlflow.db'}"


def artifact_root(uri: str) -> Path | None:
    """Where a sqlite store keeps artifacts: ``artifacts/`` beside its database file."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent / "artifacts"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"} with values as strings (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def git_commit() -> str:
    """The project's git commit (with ``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(PROJECT), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def _store_lock(root: Path | None) -> Iterator[None]:
    """An exclusive lock beside a local store (nothing for a server: it serialises itself)."""
    if root is None:
        yield
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / ".edgepc-store.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Spool:
    """Operations that could not reach the store, in order: one JSON line each in
    ``<folder>/<id>.jsonl``, artifact files copied to ``<folder>/<id>/``."""

    def __init__(self, folder: Path, uri: str, experiment: str) -> None:
        self.folder, self.uri, self.experiment = folder, uri, experiment
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = folder / f"{self.id}.jsonl"
        self.count = 0

    def add(self, op: str, args: dict[str, Any]) -> None:
        if "path" in args:  # the file as it is now: the cache may change before the replay
            source = Path(args["path"])
            kept = self.folder / self.id / f"{self.count:05d}" / source.name
            kept.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, kept)
            args = {**args, "path": str(kept)}
        self.folder.mkdir(parents=True, exist_ok=True)
        line = {"op": op, "args": args, "uri": self.uri, "experiment": self.experiment}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.count += 1


def _now() -> int:
    return int(time.time() * 1000)


def open_store(uri: str, experiment: str) -> tuple[Any, str]:
    """A client of the store and the id of its ``experiment``, both created if new (the
    experiment's artifacts beside a sqlite store)."""
    import mlflow

    root = artifact_root(uri)
    with _store_lock(root):  # two processes creating one sqlite store race in its migration
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)  # creates the tables of a new store
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return client, found.experiment_id
        location = root.as_uri() if root else None
        return client, client.create_experiment(experiment, artifact_location=location)


# The write operations, on explicit run ids: the tracker calls them, the sync replays them.
def _create_run(client: Any, uri: str, experiment: str, name: str, tags: dict, start: int,
                parent: str | None = None) -> str:  # fmt: skip
    tags = {**tags, PARENT_TAG: parent} if parent else tags
    found = client.get_experiment_by_name(experiment)  # missing: a sync into a new store
    exp_id = found.experiment_id if found is not None else open_store(uri, experiment)[1]
    return client.create_run(exp_id, start, tags, run_name=name).info.run_id


def _log(client: Any, uri: str, run: str, metrics: list | None = None,
         params: dict | None = None, tags: dict | None = None) -> None:  # fmt: skip
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(
        run,
        metrics=[Metric(k, v, t, step) for k, v, t, step in metrics or []],
        params=[Param(k, v) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
    )


def _log_dict(client: Any, uri: str, run: str, data: dict, filename: str) -> None:
    client.log_dict(run, data, filename)


def _log_artifact(client: Any, uri: str, run: str, path: str, folder: str | None) -> None:
    (client.log_artifacts if Path(path).is_dir() else client.log_artifact)(run, path, folder)


def _end_run(client: Any, uri: str, run: str, status: str, end: int) -> None:
    client.set_terminated(run, status, end)


def _register(client: Any, uri: str, run: str, model: str, alias: str, path: str, digest: str,
              tags: dict, description: str) -> str:  # fmt: skip
    """``path`` as a version of ``model`` with ``alias`` on it; a version already registered
    with the same ``edgepc.sha256`` is reused (a rerun moves the alias, adds no copy)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model, description="edgepc deployable artifacts")
    found = client.search_model_versions(f"name = '{model}' and tags.`edgepc.sha256` = '{digest}'")
    if found:
        version = str(max(int(v.version) for v in found))
    else:
        client.log_artifacts(run, path, f"registry/{alias}")
        created = client.create_model_version(
            model, f"runs:/{run}/registry/{alias}", run_id=run, tags=tags, description=description
        )
        version = str(created.version)
    client.set_registered_model_alias(model, alias, version)
    return version


OPS = {"create_run": _create_run, "log": _log, "log_dict": _log_dict,
       "log_artifact": _log_artifact, "end_run": _end_run, "register": _register}  # fmt: skip
SPOOLED = "spooled-"  # run ids handed out while the store is down


class Tracker:
    """Opens the store, the experiment and the runs; everything else in edgepc stays MLflow-free.

    ``on_error``: what a failing store does to the caller, ``"spool"`` (go on; replay later)
    or ``"stop"`` (a :class:`TrackingError` after spooling what was not recorded).
    """

    def __init__(self, uri: str | None = None, experiment: str = EXPERIMENT,
                 on_error: OnError = "stop", spool: Path | None = None) -> None:  # fmt: skip
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # A dead server should be noticed in seconds, not after minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        import mlflow

        self.mlflow = mlflow
        self.uri = uri or tracking_uri()
        self.experiment = experiment
        self.on_error = on_error
        self.spool = Spool(spool or spool_folder(), self.uri, experiment)
        self.down: str | None = None  # why the store failed, once it has
        self._runs: list[str] = []  # the open runs, innermost last
        for name in ("mlflow.store.db.utils", "alembic"):  # a new store's migration chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        mlflow.set_tracking_uri(self.uri)
        self.client: Any = None
        self.experiment_id: str | None = None
        try:
            self.client, self.experiment_id = open_store(self.uri, experiment)
        except Exception as error:  # any failure of the store
            self._failed(error)

    @property
    def run_id(self) -> str | None:
        return self._runs[-1] if self._runs else None

    def _failed(self, error: Exception) -> None:
        """The store failed: from now on every write goes to the spool."""
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        self.down = f"{type(error).__name__}: {first}"
        where = f"{self.spool.folder} (replay: python -m edgepc.tracking.sync)"
        if self.on_error == "stop":
            raise TrackingError(
                f"MLflow at {self.uri} failed ({self.down}): stopped, as tracking.on_error=stop "
                f"asks; what it did not record is spooled in {where}; rerun to resume"
            ) from None
        print(f"warning: MLflow at {self.uri} failed ({self.down}); going on, tracking is "
              f"spooled in {where}", file=sys.stderr)  # fmt: skip

    def _write(self, op: str, **args: Any) -> Any:
        if op == "create_run":
            args["local_id"] = SPOOLED + uuid.uuid4().hex  # the id the spool uses for it
        if self.down is None:
            try:
                return OPS[op](self.client, self.uri, **_without(args, "local_id"))
            except Exception as error:  # any failure of the store: this write and all later
                self.spool.add(op, args)  # ones go to the spool
                self._failed(error)  # stop: raises
        else:
            self.spool.add(op, args)
        return args.get("local_id", "spooled")

    def close_killed_runs(self) -> list[str]:
        """Runs left RUNNING by a process of this host that no longer exists: mark them FAILED
        (a killed stage shows as failed, not lost). Returns their ids."""
        if self.down is not None:
            return []
        closed = []
        host = socket.gethostname()
        runs = self.client.search_runs(
            [self.experiment_id], "attributes.status = 'RUNNING'", max_results=500
        )
        for run in runs:
            pid, run_host = run.data.tags.get("edgepc.pid"), run.data.tags.get("edgepc.host")
            if pid is None or run_host != host or _alive(int(pid)):
                continue
            self.client.set_tag(run.info.run_id, "edgepc.status", "killed")
            self.client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
        return closed

    @contextmanager
    def run(
        self, name: str, tags: Mapping[str, str], params: Mapping[str, str] | None = None
    ) -> Iterator[str]:
        """A run (nested under the open one, if any) that ends FINISHED, or FAILED/KILLED on an
        exception (re-raised). Yields the run id."""
        all_tags = {"edgepc.pid": str(os.getpid()), "edgepc.host": socket.gethostname(),
                    "mlflow.user": getpass.getuser(), "mlflow.source.name": sys.argv[0],
                    "mlflow.source.type": "LOCAL", **tags}  # fmt: skip
        run = self._write("create_run", experiment=self.experiment, name=name, tags=all_tags,
                          start=_now(), parent=self.run_id)  # fmt: skip
        self._runs.append(run)
        status = "FINISHED"
        try:
            if params:
                self._write("log", run=run, params=dict(params))
            yield run
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._runs.pop()
            if status != "FINISHED":
                self._write("log", run=run, tags={"edgepc.status": {"KILLED": "interrupted",
                            "FAILED": "failed"}[status]})  # fmt: skip
            self._write("end_run", run=run, status=status, end=_now())

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = _now()
        rows = [(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._write("log", run=self.run_id, metrics=rows)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._write("log", run=self.run_id, tags=dict(tags))

    def log_dict(self, data: Mapping, filename: str) -> None:
        """A mapping as a JSON or YAML artifact of the open run (by ``filename``'s suffix)."""
        self._write("log_dict", run=self.run_id, data=dict(data), filename=filename)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """A file, or every file under a folder, as artifacts of the open run under ``folder``."""
        self._write("log_artifact", run=self.run_id, path=str(path), folder=folder)

    log_artifacts = log_artifact

    def attach(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        files: Mapping[Path, str],
    ) -> None:
        """Add metrics, tags and files (path -> artifact folder) to an existing, finished run."""
        now = _now()
        rows = [(k, float(v), now, 0) for k, v in metrics.items()]
        self._write("log", run=run_id, metrics=rows, tags=dict(tags))
        for path, folder in files.items():
            self._write("log_artifact", run=run_id, path=str(path), folder=folder)

    def register(
        self,
        model: str,
        alias: str,
        folder: Path,
        digest: str,
        tags: Mapping[str, str],
        description: str,
    ) -> str:
        """``folder`` as a version of the registered ``model`` with ``alias`` pointing at it,
        logged to the open run under ``registry/<alias>`` (see :func:`_register`). Returns
        the version ("spooled" while the store is down)."""
        return self._write("register", run=self.run_id, model=model, alias=alias,
                           path=str(folder), digest=digest, tags=dict(tags),
                           description=description)  # fmt: skip

    def find_run(self, run_id: str) -> dict | None:
        """``{"tags", "metrics", "artifact_uri"}`` of a run of this store, or None."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return {"tags": run.data.tags, "metrics": run.data.metrics,
                "artifact_uri": run.info.artifact_uri}  # fmt: skip

    def read_artifact(self, run_id: str, path: str) -> str | None:
        """The text of one artifact file of a run, or None when it has none there."""
        from mlflow.exceptions import MlflowException

        try:
            return self.mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
        except (MlflowException, OSError):
            return None

    def stage_runs(self, stage: str) -> list[dict]:
        """Every run of a stage (newest first) as ``{"run_id", "tags", "metrics"}``."""
        return self.search({"edgepc.stage": stage})

    def search(self, tags: Mapping[str, str], finished: bool = False) -> list[dict]:
        """Runs carrying all ``tags`` (newest first; only FINISHED ones when ``finished``) as
        ``{"run_id", "tags", "metrics"}``."""
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if finished:
            clauses.append("attributes.status = 'FINISHED'")
        runs = self.client.search_runs(
            [self.experiment_id], " and ".join(clauses), max_results=1000
        )
        return [{"run_id": r.info.run_id, "tags": r.data.tags, "metrics": r.data.metrics}
                for r in runs]  # fmt: skip


def _without(args: dict, key: str) -> dict:
    return {k: v for k, v in args.items() if k != key}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
