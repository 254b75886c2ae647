"""The pipeline end to end on a small real subset of Fashion-MNIST, with a real MLflow store."""

import inspect
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepc.data import load_dataset
from edgepc.errors import TrainingError
from edgepc.export.writers import ExportError
from edgepc.pipelines.config import ConfigError, PipelineConfig, load_config, parse_override
from edgepc.pipelines.run import main
from edgepc.pipelines.runner import STAGES, run_pipeline, stage_keys
from edgepc.pipelines.stages import EmbeddingFacts, Output, StageResult, load_data
from edgepc.quant import PrecisionPlan
from edgepc.tracking import Tracker
from tests.conftest import SMALL, mlflow_ui


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return Tracker(uri, experiment="edgepc-test")


def test_config_layers_profile_then_overrides():
    config = load_config("cpu", profile="quick", overrides=["distill.train.epochs=7"])
    assert config.teacher.model == "tiny_cnn"  # from the profile
    assert config.distill.train.epochs == 7  # override wins
    assert config.distill.train.pc.tau == 0.3  # from the file
    assert load_config("jetson").target == "jetson"


def test_weight_bits_default_to_the_targets_recipe_and_enter_the_qat_key():
    bits = {t: load_config(t).qat.weight_bits for t in ("cpu", "mobile", "jetson")}
    assert bits == {"cpu": 7, "mobile": 8, "jetson": 8}
    eight = load_config("cpu", overrides=["qat.weight_bits=8"])
    assert eight.qat.weight_bits == 8
    keys, keys8 = stage_keys(load_config("cpu")), stage_keys(eight)  # 8: the key cpu had before
    assert keys["distill"] == keys8["distill"]
    assert keys["qat"] != keys8["qat"]
    assert stage_keys(load_config("cpu", overrides=["qat.weight_bits=null"])) == keys


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distil.train.epochs=2"], "unknown key 'distil'; did you mean 'distill'"),
        (["distill.train.epoch=2"], "did you mean 'distill.train.epochs'"),
        (["distill.train.lr=abc"], "distill.train.lr: Input should be a valid number"),
        (["distill.train.epochs=-1"], "greater than or equal to 0"),
        (["data.dataset=svhn"], "data.dataset"),
        (["distill"], "not key=value"),
        (["distill.train=3"], "distill.train"),
        (["distill.train.pc.tau=0"], "distill.train.pc.tau: Input should be greater than 0"),
        (["distill.train.pc.taus=1"], "did you mean 'distill.train.pc.tau'"),
        (["distill.train.baselines={rkd_angel: {}}"], "did you mean 'rkd_angle'"),
        (["qat.weight_bits=6"], "qat.weight_bits: Input should be 7 or 8"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cpu", overrides=overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"no config.*edgepc ships cpu, jetson"):
        load_config("nope")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path=tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=r"profile 'huge' is not in cpu\.yaml; it has: quick"):
        load_config("cpu", profile="huge")


def test_override_values_are_yaml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a={x: 1}") == ("a", {"x": 1})
    assert parse_override("a=null") == ("a", None)


def test_test_limit_is_a_seeded_stratified_subset_that_every_stage_reads(small):
    def test_part(*overrides: str) -> tuple[torch.Tensor, torch.Tensor]:
        config = load_config("cpu", overrides=list(overrides))
        section = config.data
        dataset = load_data(section.dataset, section.root, section.test_limit, config.seed)
        return dataset.test_images, dataset.test_labels

    assert len(test_part()[1]) == 10_000  # default: the whole test split
    images, labels = test_part("data.test_limit=1000")
    assert torch.bincount(labels).tolist() == [100] * 10  # stratified
    assert torch.equal(images, test_part("data.test_limit=1000")[0])  # seeded
    assert not torch.equal(images, test_part("data.test_limit=1000", "seed=1")[0])
    assert small.result("data")["metrics"]["test_size"] == 1000  # SMALL: 1,000 in every stage
    logits = np.load(next(small.cache.glob("teacher-*/teacher_outputs/test_logits.npy")))
    assert logits.shape == (1000, 10)


def test_cache_hit_miss_and_invalidation(tmp_path, store, small):
    assert list(small.statuses) == [stage.name for stage in STAGES]
    assert list(small.statuses.values()) == ["ran"] * 7  # the shared run computed every stage
    config = load_config("cpu", overrides=SMALL)
    cache = small.copy(tmp_path / "cache")
    first = run_pipeline(config, cache, store, progress=False, echo=lambda _: None)
    assert [s.status for s in first.stages] == ["cached"] * 6 + ["ran"]  # register: every run
    assert first.stages[1].metrics["test_top1"] > 0.3
    assert 0.5 < first.stages[2].metrics["test_pc_triplet_agreement"] <= 1.0
    assert first.stages[2].metrics == small.result("distill")["metrics"]  # as it computed them
    changed = load_config("cpu", overrides=[*SMALL, "distill.train.lr=0.002"])
    third = run_pipeline(changed, cache, store, progress=False, echo=lambda _: None)
    assert [s.status for s in third.stages] == ["cached", "cached"] + ["ran"] * 5
    seeded = load_config("cpu", overrides=[*SMALL, "seed=1"])  # the seed reaches every stage
    fourth = run_pipeline(
        seeded, cache, store, progress=False, echo=lambda _: None, until="distill"
    )
    assert [s.status for s in fourth.stages] == ["ran"] * 3
    # MLflow holds a parent and a child per stage for each invocation, with the stage's metrics.
    runs = store.client.search_runs([store.experiment_id], max_results=100)
    assert len(runs) == 2 * 8 + 4
    distill = [r for r in runs if r.data.tags.get("edgepc.stage") == "distill"]
    assert {r.data.tags["edgepc.status"] for r in distill} == {"ran", "cached"}
    assert all("test_knn_top1" in r.data.metrics for r in distill)
    assert all(len(r.data.tags["edgepc.dataset_fingerprint"]) == 64 for r in distill)


def test_another_target_shares_data_teacher_and_student(tmp_path, store, small):
    """jetson on the cpu run's cache: data, teacher and student are read back, and it
    quantizes them its own way."""
    jetson = load_config("jetson", overrides=SMALL)
    cache = small.copy(tmp_path / "cache")
    fifth = run_pipeline(jetson, cache, store, progress=False, echo=lambda _: None)
    assert [s.status for s in fifth.stages] == ["cached"] * 3 + ["ran"] * 4
    qat = fifth.stages[3].metrics
    assert qat["fp32_test_top1"] == small.result("distill")["metrics"]["test_top1"]
    assert abs(qat["qat_test_top1"] - qat["fp32_test_top1"]) < 0.05
    assert qat["qat_test_pc_triplet_agreement_fp32"] > 0.9


def test_a_student_no_better_than_chance_stops_the_pipeline_after_distill(tmp_path, store, small):
    config = load_config("cpu", overrides=[*SMALL, "distill.train.epochs=0"])  # never trained
    cache = small.copy(tmp_path / "cache", ("data", "teacher"))
    message = (
        r"^the distilled student tiny_cnn is no better than chance: val_top1 0\.\d+ on \d+ "
        r"validation images, chance 0\.100\. It did not learn in 0 epochs .* raise "
        r"distill\.train\.epochs or distill\.train\.lr, or pick a smaller distill\.student$"
    )
    with pytest.raises(TrainingError, match=message):
        run_pipeline(config, cache, store, progress=False, echo=lambda _: None)
    assert not list(cache.glob("qat-*"))  # nothing quantized or exported


def test_export_validate_register_end_to_end(tmp_path, store, small):
    """Bundles that run in onnxruntime as in PyTorch, their runtime scores, and registry
    aliases that a rerun moves without piling up versions."""
    from edgepc.export.bundle import read_manifest

    cache = small.copy(tmp_path / "cache")
    config = load_config("cpu", overrides=SMALL)
    first = run_pipeline(config, cache, store, progress=False, echo=lambda _: None)
    export, validate, register = first.stages[4:]
    assert export.metrics["fp32_parity_top1_agreement"] == 1.0
    assert export.metrics["int8_parity_top1_agreement"] >= 0.95
    distill_top1 = first.stages[2].metrics["test_top1"]
    assert validate.metrics["fp32_test_top1"] == pytest.approx(distill_top1, abs=2e-4)
    assert validate.metrics["int8_drop_points"] <= 1.0
    assert validate.metrics["int8_size_mb"] < 0.5 * validate.metrics["fp32_size_mb"]
    assert "| cpu-int8 |" in first.artifacts
    assert "@cpu-int8" in first.artifacts
    client = store.client
    model = client.get_registered_model("edgepc-cpu")
    assert set(model.aliases) == {"cpu-fp32", "cpu-int8"}
    int8 = client.get_model_version_by_alias("edgepc-cpu", "cpu-int8")
    assert int8.tags["edgepc.precision"] == "int8"
    assert "edgepc.test_top1" in int8.tags
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts("models:/edgepc-cpu@cpu-int8"))
    manifest = read_manifest(local)  # the registered copy is a complete, verified bundle
    assert manifest.name == "cpu-int8"
    assert manifest.mlflow_run_id == small.run_ids["export"]  # the run that exported it
    # The precision plan: every layer of tiny_cnn int8, its global pooling too (written as
    # GlobalAveragePool: QLinearGlobalAveragePool); the same plan in the manifest and the tables.
    plan = PrecisionPlan.from_json(manifest.precision_plan)
    assert plan.float_layers == []
    assert [p.ops for p in plan.layers].count(("mean",)) == 1
    assert len(plan.layers) == 3 + 2 + 1  # 3 convs, 2 linears, the pool
    assert f"- cpu-int8: {plan.summary()}" in first.artifacts
    assert first.stages[3].metrics["float_layers"] == 0
    # Same files again: the aliases stay on the same versions.
    again = run_pipeline(config, cache, store, progress=False, echo=lambda _: None)
    assert again.stages[6].metrics == register.metrics
    assert len(client.search_model_versions("name = 'edgepc-cpu'")) == 2
    # Parity bounds no export can meet: the stage fails with the table of what differs.
    bounds = "{top1_agreement: 1, max_logit_delta: 0, pc_triplet_agreement: 1}"
    strict = load_config("cpu", overrides=[*SMALL, f"export.fp32_parity={bounds}"])
    with pytest.raises(ExportError, match=r"parity with PyTorch failed for cpu-fp32") as error:
        run_pipeline(strict, cache, store, progress=False, echo=lambda _: None)
    assert "| cpu-fp32 | 1.0000 |" in str(error.value)
    assert "max_logit_delta" in str(error.value)


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["cpu", "distil.train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: cpu.yaml: unknown key 'distil'; did you mean 'distill'?"]


@pytest.mark.slow
def test_kill_during_distill_then_resume(tmp_path, store, small):
    """SIGKILL mid-distill (data and teacher from the shared run's cache); the rerun resumes
    from the epoch checkpoint and MLflow shows the killed stage as FAILED."""
    epochs = 12
    cache = small.copy(tmp_path / "c", ("data", "teacher"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri, "EDGEPC_CACHE": str(cache)}
    overrides = [*SMALL, f"distill.train.epochs={epochs}"]
    command = [sys.executable, "-m", "edgepc.pipelines.run", "cpu", "--no-progress",
               "--until", "distill", *overrides]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoint = None
    deadline = time.time() + 300
    while time.time() < deadline and checkpoint is None and proc.poll() is None:
        found = list(cache.glob("distill-*/training.pt"))
        checkpoint = found[0] if found else None
        time.sleep(0.05)
    assert checkpoint is not None, proc.communicate()[0].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)  # at the first checkpoint: most epochs are still to come
    proc.wait()
    done_before = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= done_before < epochs
    # The rerun sees the checkpoint and trains only the epochs that are left.
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "marked 2 run(s) of a killed earlier invocation as FAILED" in out.stdout
    assert torch.load(checkpoint, weights_only=True)["epoch"] == epochs
    tracker = Tracker(store.uri)
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=50)
    killed = [r for r in runs if r.data.tags.get("edgepc.status") == "killed"]
    assert {r.data.tags.get("edgepc.stage", "pipeline") for r in killed} == {"distill", "pipeline"}
    assert all(r.info.status == "FAILED" for r in killed)
    history = tracker.client.get_metric_history(
        next(r for r in runs if r.data.tags.get("edgepc.stage") == "distill"
             and r.info.status == "FINISHED").info.run_id,
        "loss",
    )  # fmt: skip
    assert {m.step for m in history} == set(range(done_before + 1, epochs + 1))
    assert Path(checkpoint).exists()


@pytest.mark.slow
def test_ui_serves_the_store(tmp_path, store):
    import json
    import urllib.request

    with mlflow_ui(store.uri) as address:
        url = f"{address}/api/2.0/mlflow/experiments/search"
        body = json.dumps({"max_results": 10}).encode()
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            names = [e["name"] for e in json.load(response)["experiments"]]
    assert "edgepc-test" in names


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "cannot load teacher checkpoint"),
        # wrn16_4's weights for tiny_cnn
        (None, r"weights do not fit tiny_cnn: 21 missing keys .*, 82 unexpected keys"),
    ],
)
def test_bad_teacher_checkpoint_is_a_model_error(tmp_path, store, content, message):
    from edgepc.errors import ModelError
    from edgepc.models import build_model

    path = tmp_path / "teacher.pt"
    if content is None:
        torch.save(build_model("wrn16_4").model.state_dict(), path)
    else:
        path.write_bytes(content)
    config = load_config("cpu", overrides=[*SMALL, f"teacher.checkpoint={path}"])
    with pytest.raises(ModelError, match=message):
        run_pipeline(config, tmp_path / "cache", store, progress=False, echo=lambda _: None)
    failed = store.client.search_runs([store.experiment_id], "attributes.status = 'FAILED'")
    assert {r.data.tags.get("edgepc.stage") for r in failed} >= {"teacher"}


def test_each_stage_is_given_exactly_what_its_cache_key_covers():
    """A stage takes its key's config sections (its own first, typed as in the config), then
    its upstream stages' typed outputs, then the context: it cannot read a config key that its
    cache key leaves out, so a change there cannot be missed by the cache."""
    fields = PipelineConfig.model_fields
    facts = {stage.name: stage.facts for stage in STAGES}
    for stage in STAGES:
        hints = typing.get_type_hints(stage.run)
        names = list(inspect.signature(stage.run).parameters)
        assert names == ["section", *stage.sections[1:], *stage.upstream, "ctx"], stage.name
        assert hints["section"] is fields[stage.sections[0]].annotation, stage.name
        for key in stage.sections[1:]:
            assert hints[key] is fields[key].annotation, stage.name
        for upstream in stage.upstream:
            assert hints[upstream] == Output[facts[upstream]], (stage.name, upstream)
        assert hints["return"] == StageResult[stage.facts], stage.name


def test_a_result_whose_facts_this_version_does_not_hand_on_runs_again(tmp_path):
    from edgepc.pipelines.runner import _load_result, _save_result

    stage = next(stage for stage in STAGES if stage.name == "distill")
    _save_result(tmp_path, StageResult({"test_top1": 0.5}, {"model": "student.pt"},
                                       EmbeddingFacts("tiny_cnn", 32)))  # fmt: skip
    loaded = _load_result(stage, tmp_path)
    assert loaded == Output({"test_top1": 0.5}, {"model": "student.pt"},
                            EmbeddingFacts("tiny_cnn", 32), tmp_path)  # fmt: skip
    assert loaded.file("model") == tmp_path / "student.pt"
    older = {"metrics": {}, "files": {}, "facts": {"embedding_dim": 32}}  # before "model"
    (tmp_path / "result.json").write_text(json.dumps(older))
    assert _load_result(stage, tmp_path) is None


def test_an_option_added_later_leaves_stage_keys_alone_at_its_default():
    from edgepc.pipelines.runner import _key_content

    assert _key_content({"train": {"recalibrate_bn": False, "lr": 0.1}}) == {"train": {"lr": 0.1}}
    assert _key_content({"train": {"recalibrate_bn": True}}) == {"train": {"recalibrate_bn": True}}
    base = stage_keys(load_config("cpu"))
    on = stage_keys(load_config("cpu", overrides=["distill.train.recalibrate_bn=true"]))
    assert on["teacher"] == base["teacher"]
    assert on["distill"] != base["distill"]
    # The committed study records were keyed before these options existed (docs/RESULTS.json)
    for option, used in (
        ("data.test_limit", "1000"),
        ("distill.train.pc.neighbourhood", "0.1"),
        ("distill.train.pc.queue", "512"),
    ):
        assert stage_keys(load_config("cpu", overrides=[f"{option}=null"])) == base
        assert (
            stage_keys(load_config("cpu", overrides=[f"{option}={used}"]))["distill"]
            != (base["distill"])
        )


def test_a_teacher_checkpoint_is_keyed_by_its_bytes_not_its_path(tmp_path):
    def teacher_key(path):
        return stage_keys(load_config("cpu", overrides=[f"teacher.checkpoint={path}"]))["teacher"]

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.pt").write_bytes(b"weights")
    (tmp_path / "b.pt").write_bytes(b"weights")
    assert teacher_key(tmp_path / "a" / "t.pt") == teacher_key(tmp_path / "b.pt")
    (tmp_path / "b.pt").write_bytes(b"other weights")
    assert teacher_key(tmp_path / "a" / "t.pt") != teacher_key(tmp_path / "b.pt")
    # A file that cannot be read keeps its path in the key; loading it then fails clearly.
    assert teacher_key(tmp_path / "none.pt") != teacher_key(tmp_path / "b.pt")


def test_a_student_checkpoint_keys_the_distill_stage_by_its_bytes(tmp_path):
    base = stage_keys(load_config("cpu"))

    def keys(path):
        return stage_keys(load_config("cpu", overrides=[f"distill.student_checkpoint={path}"]))

    assert stage_keys(load_config("cpu", overrides=["distill.student_checkpoint=null"])) == base
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "s.pt").write_bytes(b"weights")
    (tmp_path / "b.pt").write_bytes(b"weights")
    first = keys(tmp_path / "a" / "s.pt")
    assert first["teacher"] == base["teacher"]
    assert first["distill"] != base["distill"]
    assert keys(tmp_path / "b.pt") == first
    (tmp_path / "b.pt").write_bytes(b"other weights")
    assert keys(tmp_path / "b.pt")["distill"] != first["distill"]


@pytest.mark.slow
def test_a_64_px_rgb_image_folder_goes_through_every_stage_and_onto_the_device(tmp_path, store):
    """Fashion-MNIST written as 64-px RGB PNGs: the size and the channels reach the models (the
    standard stride-2 stems), the bundles, the runtimes and the on-device check."""
    from edgepc.data.datasets import first_images, write_image_folder
    from edgepc.export.bundle import read_manifest

    rgb = first_images(load_dataset("fashion-mnist", download=False), 900, 200, 64, 3)
    root = write_image_folder(rgb, tmp_path / "fashion-64")
    folder = ["data.dataset=imagefolder", f"data.root={root}", "data.val_fraction=0.1",
              "data.train_limit=null", "distill.train.epochs=3"]  # fmt: skip
    cache, rows = tmp_path / "cache", {}
    for target in ("cpu", "mobile"):
        config = load_config(target, overrides=[*SMALL, *folder])
        report = run_pipeline(config, cache, store, progress=False, echo=lambda _: None)
        assert [s.status for s in report.stages][-4:] == ["ran"] * 4
        rows |= report.rows
        for name, row in report.rows.items():
            assert row["test_top1"] > 0.2, (name, row)  # chance 0.1, 2·SE 0.04 at 200 images
            manifest = read_manifest(next(cache.glob(f"export-*/{name}")))
            shape = manifest.input.shape
            assert shape[1:] == ([64, 64, 3] if manifest.input.layout == "NHWC" else [3, 64, 64])
    data = json.loads(next(cache.glob("data-*/result.json")).read_text())["facts"]
    assert (data["channels"], data["image_size"]) == (3, [64, 64])
    bundle = next(cache.glob("export-*/cpu-int8"))
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "edgepc_device", "cpu", str(bundle), "--out", str(out),
               "--iterations", "20"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    device = json.loads(out.read_text())["accuracy"]
    assert device["images"] == 200
    assert device["top1"] == rows["cpu-int8"]["test_top1"]  # the validate stage's


def test_layers_kept_float_reach_the_bundle_and_a_saved_speed_plan_is_read_back(
    tmp_path, store, small
):
    """``qat.float_layers`` and the speed plan (on here) in the qat stage's plan, restored by the
    export stage: onnxruntime runs exactly the convs and linears the plan lists as float. A
    rerun of the stage reads its saved choice back instead of timing again."""
    from edgepc.export.inspect import float_compute, onnxruntime_ops
    from edgepc.export.speed_plan import SpeedPlan

    cache = small.copy(tmp_path / "cache", ("data", "teacher", "distill"))
    overrides = [*SMALL, "qat.speed_plan=true", "qat.float_layers=[features.0]"]
    config = load_config("cpu", overrides=overrides)
    run_pipeline(config, cache, store, progress=False, echo=lambda _: None, until="export")
    qat = next(cache.glob("qat-*"))
    speed = SpeedPlan.from_json(json.loads((qat / "speed_plan.json").read_text()))
    plan = {p.layer: p for p in PrecisionPlan.from_json(
        json.loads((qat / "precision_plan.json").read_text())).layers}  # fmt: skip
    assert plan["features.0"].reason == "kept float by qat.float_layers"
    assert not plan["features.0"].int8
    for layer, why in speed.keep_float.items():
        assert (plan[layer].int8, plan[layer].reason) == (False, why)
    weighted = ("conv", "linear")
    floats = sum(not p.int8 and p.ops[0] in weighted for p in plan.values())
    bundle = next(cache.glob("export-*")) / "cpu-int8"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert PrecisionPlan.from_json(manifest["precision_plan"]).layers == tuple(plan.values())
    ops = onnxruntime_ops(bundle / "model.onnx")
    assert sum(float_compute(ops).values()) == floats, ops

    # the stage again in its folder, its choice edited: read back, not measured again
    saved = speed.to_json() | {"keep_float": {"classifier": "a saved choice"}}
    (qat / "speed_plan.json").write_text(json.dumps(saved))
    for name in ("result.json", "qat_training.pt"):
        (qat / name).unlink()
    run_pipeline(config, cache, store, progress=False, echo=lambda _: None, until="qat")
    plan = PrecisionPlan.from_json(json.loads((qat / "precision_plan.json").read_text()))
    assert {p.layer: p.reason for p in plan.float_layers if p.ops[0] in weighted} == {
        "features.0": "kept float by qat.float_layers", "classifier": "a saved choice"}  # fmt: skip
