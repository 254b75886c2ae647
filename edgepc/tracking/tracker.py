"""The tracker a pipeline writes through: :class:`Tracker` (MLflow) or :class:`NoTracking`.

One parent run per pipeline invocation, one nested run per stage. Every write is one operation
of :mod:`edgepc.tracking.ops` on explicit run ids. When the store fails, that operation and all
later ones go to a spool (:mod:`edgepc.tracking.spool`) instead. ``on_error="spool"`` (the
default, as in the pipeline config) goes on; ``"stop"`` stops with one line (what it could not
record is spooled all the same).
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from edgepc.errors import EdgepcError
from edgepc.tracking.ops import OPS, now
from edgepc.tracking.queries import Runs
from edgepc.tracking.spool import Spool, spool_folder
from edgepc.tracking.store import EXPERIMENT, open_store, tracking_uri

OnError = Literal["spool", "stop"]
SPOOLED = "spooled-"  # run ids handed out while the store is down


class TrackingError(EdgepcError):
    """The MLflow store failed and the pipeline was asked to stop (tracking.on_error=stop)."""


class Tracking(Protocol):
    """What the pipeline runner writes to; ``uri`` names where a user sees it."""

    uri: str

    def run(
        self, name: str, tags: Mapping[str, str], params: Mapping[str, str] | None = None
    ) -> Any: ...  # a context manager yielding the run id (None: not tracked)
    def close_killed_runs(self) -> list[str]: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_dict(self, data: Mapping, filename: str) -> None: ...
    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...
    def register(self, model: str, alias: str, folder: Path, digest: str,
                 tags: Mapping[str, str], description: str) -> str: ...  # fmt: skip


class NoTracking:
    """Records nothing: the pipeline's ranks > 0, profiling runs, and users without MLflow."""

    uri = "nowhere (not tracked)"

    @contextmanager
    def run(self, name: str, tags: Mapping[str, str],
            params: Mapping[str, str] | None = None) -> Iterator[None]:  # fmt: skip
        yield None

    def close_killed_runs(self) -> list[str]:
        return []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_dict(self, data: Mapping, filename: str) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def register(self, model: str, alias: str, folder: Path, digest: str,
                 tags: Mapping[str, str], description: str) -> str:  # fmt: skip
        return "not registered"


class Tracker:
    """Opens the store, the experiment and the runs; everything else in edgepc stays MLflow-free.

    ``on_error``: what a failing store does to the caller, ``"spool"`` (go on; replay later)
    or ``"stop"`` (a :class:`TrackingError` after spooling what was not recorded).
    """

    def __init__(self, uri: str | None = None, experiment: str = EXPERIMENT,
                 on_error: OnError = "spool", spool: Path | None = None) -> None:  # fmt: skip
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # A dead server should be noticed in seconds, not after minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        import mlflow

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

    @property
    def runs(self) -> Runs:
        """Reading the experiment's runs back (:class:`edgepc.tracking.queries.Runs`)."""
        return Runs(self.client, str(self.experiment_id))

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
                          start=now(), parent=self.run_id)  # fmt: skip
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
            self._write("end_run", run=run, status=status, end=now())

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        stamp = now()
        rows = [(k, float(v), stamp, step or 0) for k, v in metrics.items()]
        self._write("log", run=self.run_id, metrics=rows)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._write("log", run=self.run_id, tags=dict(tags))

    def log_dict(self, data: Mapping, filename: str) -> None:
        """A mapping as a JSON or YAML artifact of the open run (by ``filename``'s suffix)."""
        self._write("log_dict", run=self.run_id, data=dict(data), filename=filename)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """A file, or every file under a folder, as artifacts of the open run under ``folder``."""
        self._write("log_artifact", run=self.run_id, path=str(path), folder=folder)

    def attach(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        files: Mapping[Path, str],
    ) -> None:
        """Add metrics, tags and files (path -> artifact folder) to an existing, finished run."""
        stamp = now()
        rows = [(k, float(v), stamp, 0) for k, v in metrics.items()]
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
        logged to the open run under ``registry/<alias>`` (see
        :func:`edgepc.tracking.registry.register`). Returns the version ("spooled" while the
        store is down)."""
        return self._write("register", run=self.run_id, model=model, alias=alias,
                           path=str(folder), digest=digest, tags=dict(tags),
                           description=description)  # fmt: skip


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
