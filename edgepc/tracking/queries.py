"""Reading runs back: the study's cache of trained runs and the device reports' lookups."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class Runs:
    """The runs of one experiment of a store (``Tracker.runs`` opens it on the tracker's)."""

    def __init__(self, client: Any, experiment_id: str) -> None:
        self.client, self.experiment_id = client, experiment_id

    def find(self, run_id: str) -> dict | None:
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

        with tempfile.TemporaryDirectory() as folder:
            try:
                return Path(self.client.download_artifacts(run_id, path, folder)).read_text()
            except (MlflowException, OSError):
                return None

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

    def of_stage(self, stage: str) -> list[dict]:
        """Every run of a pipeline stage (newest first), as :meth:`search` gives them."""
        return self.search({"edgepc.stage": stage})
