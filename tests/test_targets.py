"""A deployment target is one record of edgepc.targets.TARGETS: a throwaway one (not shipped)
goes through quantization, export, parity and validation with no other edit."""

import dataclasses
import json

import pytest

from edgepc.export.bundle import read_manifest
from edgepc.pipelines.config import ConfigError, load_config
from edgepc.pipelines.runner import run_pipeline
from edgepc.quant.recipes import ONNXRUNTIME_QDQ
from edgepc.targets import TARGETS, get_target
from edgepc.tracking import Tracker
from tests.conftest import SMALL


def test_every_target_names_its_runtime_file_and_device_command():
    assert list(TARGETS) == ["cpu", "mobile", "jetson"]
    assert {t.model_file for t in TARGETS.values()} == {"model.onnx", "model.tflite"}
    for name, target in TARGETS.items():
        assert target.name == name
        assert target.device_command.startswith("python3 -m edgepc_device ")
    assert get_target("jetson").tensorrt_engine
    assert not get_target("cpu").tensorrt_engine
    with pytest.raises(ConfigError, match="unknown target 'tpu': edgepc has cpu, mobile, jetson"):
        load_config("cpu", overrides=["target=tpu"])


@pytest.mark.slow
def test_a_new_target_is_one_record(tmp_path, monkeypatch, small):
    """``cpu8``: ONNX for onnxruntime with 8-bit weights and tighter int8 parity bounds."""
    record = dataclasses.replace(
        TARGETS["cpu"], name="cpu8", recipe=dataclasses.replace(ONNXRUNTIME_QDQ, weight_bits=8),
        int8_parity=dataclasses.replace(TARGETS["cpu"].int8_parity, top1_agreement=0.96),
    )  # fmt: skip
    monkeypatch.setitem(TARGETS, "cpu8", record)
    config = load_config("cpu", overrides=[*SMALL, "target=cpu8", "name=cpu8"])
    assert config.qat.weight_bits == 8
    assert config.export.int8_parity.top1_agreement == 0.96
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cache = small.copy(tmp_path / "cache", ("data", "teacher", "distill"))
    report = run_pipeline(config, cache, Tracker(uri), progress=False, echo=lambda _: None,
                          until="validate")  # fmt: skip
    assert set(report.rows) == {"cpu8-fp32", "cpu8-int8"}
    for name, row in report.rows.items():
        manifest = read_manifest(next(cache.glob("export-*")) / name)
        assert (manifest.target, manifest.runtime, manifest.model) == (
            "cpu8", "onnxruntime", "model.onnx")  # fmt: skip
        assert row["drop_points"] < 10  # the gate of SMALL
    export = next(s.metrics for s in report.stages if s.stage == "export")
    assert export["int8_parity_top1_agreement"] >= 0.96  # the record's bound, met
    validate = json.loads(next(cache.glob("validate-*/result.json")).read_text())
    assert "python3 -m edgepc_device cpu BUNDLE" in validate["facts"]["table"]
