"""Where runs are kept and what every run records about its provenance.

The default store is ``sqlite:///mlflow/mlflow.db`` in the working directory, artifacts in
``mlflow/artifacts`` beside it; ``MLFLOW_TRACKING_URI`` overrides it (e.g. a server).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = "edgepc"
# MLflow 3 opens an experiment on the view its kind asks for: without this tag, on the GenAI
# overview (traces) instead of the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PACKAGE = Path(__file__).resolve().parents[1]


def store_folder() -> Path:
    """``mlflow/`` in the working directory: the default store's database and artifacts."""
    return Path.cwd() / "mlflow"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the sqlite store in :func:`store_folder`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_folder() / 'mlflow.db'}"


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
    """The git commit of edgepc's source (with ``+dirty`` when the tree has changes), or
    ``unknown`` (an installed package is not a checkout)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(PACKAGE), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(PACKAGE), "status", "--porcelain", "--untracked-files=no"],
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


def open_store(uri: str, experiment: str) -> tuple[Any, str]:
    """A client of the store and the id of its ``experiment``, both created if new (the
    experiment's artifacts beside a sqlite store, its kind model development)."""
    import mlflow

    root = artifact_root(uri)
    with _store_lock(root):  # two processes creating one sqlite store race in its migration
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)  # creates the tables of a new store
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = root.as_uri() if root else None
            exp_id = client.create_experiment(experiment, location, tags=EXPERIMENT_KIND)
            return client, exp_id
        for key, value in EXPERIMENT_KIND.items():  # a store made before the tag
            if found.tags.get(key) != value:
                client.set_experiment_tag(found.experiment_id, key, value)
        return client, found.experiment_id
