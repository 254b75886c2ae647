"""Faults: pipelines that meet each other on one cache and store."""

import os
import re
import subprocess
import sys

import pytest

import mlflow
from tests.test_distributed import TINY


@pytest.mark.slow
def test_two_pipelines_at_once_on_one_cache_compute_each_stage_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # fmt: skip
    command = [sys.executable, "-m", "edgepc.pipelines.run", "cpu", "--cache",
               str(tmp_path / "cache"), *TINY]  # fmt: skip
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]  # fmt: skip
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
    for stage in ("data", "teacher", "distill"):
        statuses = sorted(re.search(rf"^{stage}\s+(\w+)", out, re.M)[1] for out, _ in outputs)
        assert statuses == ["cached", "ran"], stage  # the second waited, then reused the first's
    assert any("waiting: another pipeline" in out for out, _ in outputs)
    folders = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert folders == ["data", "distill", "teacher"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    finished = [r for r in client.search_runs(ids) if r.info.status == "FINISHED"]
    assert len(finished) == 8  # two parents with three stage runs each
