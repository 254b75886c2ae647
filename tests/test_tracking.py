"""The tracker's spool and its replay (edgepc.tracking.sync), on real sqlite stores."""

import json

import pytest

import mlflow
from edgepc.errors import EdgepcError
from edgepc.tracking import OPS, Tracker, TrackingError
from edgepc.tracking.spool import replay
from edgepc.tracking.sync import main

DOWN = "sqlite:////proc/edgepc-no-such-store/mlflow.db"  # fails at once, like a dead store


def spooled_pipeline(tmp_path):
    """What a pipeline records while the store is down: a parent, a finished child with
    params, metrics per step, a tag and an artifact, and a failed child."""
    tracker = Tracker(DOWN, on_error="spool", spool=tmp_path / "spool")
    assert tracker.down is not None
    (tmp_path / "student.pt").write_bytes(b"weights")
    with tracker.run("cpu", {"edgepc.kind": "pipeline"}) as parent:
        with tracker.run("distill", {"edgepc.stage": "distill"}, {"lr": "0.003"}):
            for step in (1, 2):
                tracker.log_metrics({"loss": 1.0 / step}, step)
            tracker.set_tags({"edgepc.dataset_fingerprint": "abc"})
            tracker.log_artifact(tmp_path / "student.pt", "distill")
        with pytest.raises(ValueError, match="boom"), tracker.run("qat", {}):
            raise ValueError("boom")
    (tmp_path / "student.pt").unlink()  # the spool kept its own copy
    assert parent.startswith("spooled-")
    (spool,) = (tmp_path / "spool").glob("*.jsonl")
    return spool


def runs_by_name(uri):
    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client, {r.info.run_name: r for r in client.search_runs(ids)}


def test_a_spool_replays_into_the_store_with_runs_metrics_and_artifacts(tmp_path):
    spool = spooled_pipeline(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    count, into = replay(spool, uri)
    assert (count, into) == (12, uri)  # 3 runs opened and ended, 6 writes
    assert list((tmp_path / "spool").iterdir()) == []  # replayed: spool and copies removed
    client, runs = runs_by_name(uri)
    assert set(runs) == {"cpu", "distill", "qat"}
    parent = runs["cpu"].info.run_id
    assert runs["distill"].data.tags["mlflow.parentRunId"] == parent
    assert runs["distill"].data.params == {"lr": "0.003"}
    assert runs["distill"].data.tags["edgepc.dataset_fingerprint"] == "abc"
    history = client.get_metric_history(runs["distill"].info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]
    files = [f.path for f in client.list_artifacts(runs["distill"].info.run_id, "distill")]
    assert files == ["distill/student.pt"]
    assert [runs[n].info.status for n in ("cpu", "distill", "qat")] == [
        "FINISHED", "FINISHED", "FAILED"]  # fmt: skip
    assert runs["qat"].data.tags["edgepc.status"] == "failed"


def test_a_sync_that_fails_half_way_goes_on_from_there(tmp_path, monkeypatch, capsys):
    spool = spooled_pipeline(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    real, calls = OPS["log"], []

    def flaky(*args, **kwargs):  # the store goes down again at the 3rd write of metrics
        calls.append(1)
        if len(calls) == 3:
            raise OSError("connection reset")
        return real(*args, **kwargs)

    monkeypatch.setitem(OPS, "log", flaky)
    capsys.readouterr()
    assert main(["--uri", uri, "--spool", str(tmp_path / "spool")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "failed at operation" in err
    assert "goes on from there" in err
    assert spool.exists()
    assert main(["--uri", uri, "--spool", str(tmp_path / "spool")]) == 0
    client, runs = runs_by_name(uri)
    assert len(client.search_runs([runs["cpu"].info.experiment_id])) == 3  # no run twice
    history = client.get_metric_history(runs["distill"].info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]  # no metric twice
    assert not spool.exists()


def test_a_line_cut_short_by_a_crash_is_not_replayed(tmp_path):
    spool = spooled_pipeline(tmp_path)
    lines = spool.read_text().splitlines()
    spool.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed while appending
    count, _ = replay(spool, f"sqlite:///{tmp_path / 'store.db'}")
    assert count == 3
    assert json.loads(lines[0])["op"] == "create_run"


def test_stop_is_one_line_when_the_store_is_down(tmp_path):
    with pytest.raises(TrackingError) as error:
        Tracker(DOWN, on_error="stop", spool=tmp_path / "spool")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"MLflow at {DOWN} failed")
    assert "tracking.on_error=stop" in message
    assert isinstance(error.value, EdgepcError)


def test_nothing_to_sync(tmp_path, capsys):
    assert main(["--spool", str(tmp_path / "none")]) == 0
    assert "nothing to sync" in capsys.readouterr().out


def test_the_experiment_says_it_is_model_development(tmp_path):
    """MLflow 3 opens an experiment without ``mlflow.experimentKind`` on its GenAI overview;
    a new store gets the tag, and so does a store made before it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("edgepc")  # as an earlier edgepc left it: no kind
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    tracker = Tracker(uri)
    assert tracker.experiment_id == old
    kind = client.get_experiment(old).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"
    fresh = Tracker(uri, experiment="edgepc-new").experiment_id
    assert client.get_experiment(fresh).tags["mlflow.experimentKind"] == kind


def test_the_default_store_and_spool_are_in_the_working_directory(tmp_path, monkeypatch):
    from edgepc.pipelines.runner import default_cache
    from edgepc.tracking import tracking_uri
    from edgepc.tracking.spool import spool_folder

    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "EDGEPC_SPOOL", "EDGEPC_CACHE"):
        monkeypatch.delenv(name, raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert spool_folder() == tmp_path / "mlflow-spool"
    assert default_cache() == tmp_path / ".edgepc-cache"
