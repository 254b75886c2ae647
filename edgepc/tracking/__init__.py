"""MLflow tracking: the only module of edgepc that imports mlflow.

One parent run per pipeline invocation, one nested run per stage. The default store is
``sqlite:///<project>/mlflow/mlflow.db`` with artifacts in ``<project>/mlflow/artifacts``;
``MLFLOW_TRACKING_URI`` overrides it (e.g. a server).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
STORE = PROJECT / "mlflow"
EXPERIMENT = "edgepc"


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


class Tracker:
    """Opens the store, the experiment and the runs; everything else in edgepc stays MLflow-free."""

    def __init__(self, uri: str | None = None, experiment: str = EXPERIMENT) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow

        self.mlflow = mlflow
        self.uri = uri or tracking_uri()
        for name in ("mlflow.store.db.utils", "alembic"):  # a new store's migration chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        root = artifact_root(self.uri)
        mlflow.set_tracking_uri(self.uri)
        with _store_lock(root):  # two processes creating one sqlite store race in its migration
            self.client = mlflow.MlflowClient(self.uri)
            self.client.search_experiments(max_results=1)  # creates the tables of a new store
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                artifacts = root.as_uri() if root is not None else None
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=artifacts
                )
            else:
                self.experiment_id = found.experiment_id
        self.run_id: str | None = None

    def close_killed_runs(self) -> list[str]:
        """Runs left RUNNING by a process of this host that no longer exists: mark them FAILED
        (a killed stage shows as failed, not lost). Returns their ids."""
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
        mlflow = self.mlflow
        nested = mlflow.active_run() is not None
        all_tags = {"edgepc.pid": str(os.getpid()), "edgepc.host": socket.gethostname(), **tags}
        with mlflow.start_run(
            run_name=name, experiment_id=self.experiment_id, nested=nested, tags=all_tags
        ) as active:
            if params:
                mlflow.log_params(dict(params))
            try:
                yield active.info.run_id
            except KeyboardInterrupt:
                mlflow.set_tag("edgepc.status", "interrupted")
                mlflow.end_run("KILLED")
                raise
            except BaseException:
                mlflow.set_tag("edgepc.status", "failed")
                mlflow.end_run("FAILED")
                raise

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.mlflow.set_tags(dict(tags))

    def log_dict(self, data: Mapping, filename: str) -> None:
        """A mapping as a JSON or YAML artifact of the open run (by ``filename``'s suffix)."""
        self.mlflow.log_dict(dict(data), filename)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def attach(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        files: Mapping[Path, str],
    ) -> None:
        """Add metrics, tags and files (path -> artifact folder) to an existing, finished run."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        for path, folder in files.items():
            self.client.log_artifact(run_id, str(path), folder)

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

    def log_artifacts(self, path: Path, folder: str) -> None:
        """Every file under the folder ``path``, as artifacts under ``folder``."""
        self.mlflow.log_artifacts(str(path), artifact_path=folder)

    def register(
        self,
        model: str,
        alias: str,
        folder: Path,
        digest: str,
        tags: Mapping[str, str],
        description: str,
    ) -> str:
        """``folder`` as a version of the registered ``model`` with ``alias`` pointing at it.

        A version already registered with the same ``edgepc.sha256`` tag is reused (a rerun
        moves the alias, it does not pile up copies); otherwise the folder is logged to the
        open run under ``registry/<alias>`` and becomes a new version. Returns the version.
        """
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model)
        except MlflowException:
            self.client.create_registered_model(model, description="edgepc deployable artifacts")
        found = self.client.search_model_versions(
            f"name = '{model}' and tags.`edgepc.sha256` = '{digest}'"
        )
        if found:
            version = str(max(int(v.version) for v in found))
        else:
            run = self.mlflow.active_run()
            self.log_artifacts(folder, f"registry/{alias}")
            created = self.client.create_model_version(
                model, f"runs:/{run.info.run_id}/registry/{alias}", run_id=run.info.run_id,
                tags=dict(tags), description=description,
            )  # fmt: skip
            version = str(created.version)
        self.client.set_registered_model_alias(model, alias, version)
        return version


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
