"""The MLflow UI in a real browser (headless Chromium, Debian's ``chromium``; ``.ci/run``
installs it): the experiment page lists the pipeline runs, and the comparison view shows two of
them side by side with edgepc's metrics for both."""

import json
import re
import shutil
import subprocess
import urllib.parse

import pytest

from edgepc.pipelines.config import load_config
from edgepc.pipelines.runner import run_pipeline
from edgepc.pipelines.ui import runs_page
from edgepc.tracking import Tracker
from tests.conftest import SMALL, mlflow_ui

CHROMIUM = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--virtual-time-budget=20000", "--window-size=1600,1400")  # fmt: skip


def chromium(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "no chromium here: apt-get install chromium (.ci/run installs it)"
    return subprocess.run([binary, *CHROMIUM, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_mlflow_ui_lists_and_compares_pipeline_runs(tmp_path, monkeypatch, small):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker(uri)
    cache = small.copy(tmp_path / "cache")  # seed 0 is read from it, seed 1 trains
    reports = [
        run_pipeline(load_config("cpu", overrides=[*SMALL, f"seed={seed}", f"name=ui-{seed}"]),
                     cache, tracker, progress=False, echo=lambda _: None)
        for seed in (0, 1)
    ]  # fmt: skip
    # The validate stage's runs: the artifacts' runtime metrics, named alike in every run.
    runs = [next(s.run_id for s in r.stages if s.stage == "validate") for r in reports]
    with mlflow_ui(uri) as address:
        query = urllib.parse.urlencode(
            {"runs": json.dumps(runs), "experiments": json.dumps([tracker.experiment_id])}
        )
        url = f"{address}/#/compare-runs?{query}"
        dom = chromium("--dump-dom", url)
        shot = tmp_path / "compare-runs.png"
        chromium(f"--screenshot={shot}", url)
        # Where a user goes first: the link `python -m edgepc.pipelines.ui` prints.
        experiment = chromium("--dump-dom", runs_page(address, str(tracker.experiment_id)))
    page = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", experiment.stdout))
    for report in reports:  # the runs table, not the GenAI overview of traces
        assert report.name in page, f"pipeline run {report.name} is not on the experiment page"
    assert "Run Name" in page
    assert "No data available" not in page
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom.stdout))
    assert "Run details" in text  # the comparison page rendered, not an error page
    for run_id in runs:
        assert run_id in text
    # The page lists the first metrics alphabetically (a virtualised table): the fp32 file's.
    for metric in ("fp32_test_top1", "fp32_test_pc_triplet_agreement", "fp32_p50_ms_1t"):
        assert metric in text, f"{metric} is not on the compare page"
    for report in reports:  # each run's own value is shown (the two seeds differ)
        value = report.rows["cpu-fp32"]["test_top1"]
        assert f"{value:.3f}" in text or f"{value:.3f}".rstrip("0") in text
    assert shot.stat().st_size > 10_000  # a real screenshot, kept with the store
    tracker.attach(reports[0].run_id, {}, {}, {shot: "ui"})
