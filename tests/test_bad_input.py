"""Bad input at every user-facing entry point: each case must end in a typed error whose
message is one line (exit code 2 from a CLI, no traceback), never in a crash or a silent result.
Plus property-based fuzzing of the config parser and the manifest reader."""
# ruff: noqa: E501  (the case table reads best one case per line)

import gzip
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepc.devices import ingest
from edgepc.errors import ModelError
from edgepc.export.bundle import MANIFEST, BundleError, read_manifest
from edgepc.models import build_model
from edgepc.models.specs import load_weights
from edgepc.pipelines import run
from edgepc.pipelines.config import ConfigError, PipelineConfig, load_config
from edgepc.tracking import sync
from tests.conftest import bundle

FAST = ["--until", "teacher", "--no-progress", "data.train_limit=300", "teacher.model=tiny_cnn",
        "teacher.train.epochs=0"]  # fmt: skip


class Payload:
    """A pickle that runs a command when loaded: what an untrusted checkpoint can hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _files(tmp: Path) -> dict[str, Path]:
    """The hostile and broken files the cases point at."""
    files = {"list.yaml": "- a\n- b\n", "truncated.yaml": "name: cpu\ntarget: [cpu,\n",
             "random.pt": random.Random(0).randbytes(4096)}  # fmt: skip
    for name, content in files.items():
        path = tmp / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    torch.save(build_model("resnet18").model.state_dict(), tmp / "other.pt")
    torch.save(build_model("tiny_cnn").model.state_dict(), tmp / "whole.pt")
    (tmp / "truncated.pt").write_bytes((tmp / "whole.pt").read_bytes()[:3000])
    with (tmp / "evil.pt").open("wb") as f:
        pickle.dump({"conv.weight": Payload(tmp / "pwned")}, f)
    mnist = tmp / "data" / "mnist"  # an $EDGEPC_DATA folder with a cut-off gzip
    mnist.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        (mnist / f"{stem}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 64)[:30])
    (tmp / "report.json").write_text('{"device": "x"}')
    (tmp / "bad.json").write_text("{not json")
    (tmp / "a-file").write_text("")
    line = {"op": "end_run", "args": {"run": "r", "status": "FINISHED", "end": 0},
            "uri": "sqlite:////proc/x/m.db", "experiment": "edgepc"}  # fmt: skip
    for folder, second in (("spool", "{cut"), ("spool-ok", json.dumps(line))):
        (tmp / folder).mkdir()
        (tmp / folder / "1.jsonl").write_text(f"{json.dumps(line)}\n{second}\n{json.dumps(line)}\n")
    return {p.name: p for p in tmp.iterdir()}


# (case, CLI, arguments with {name} for the files above ({{ }} for braces), environment, what
# the message says)
CASES = [
    ("unknown override key", "run", ["cpu", "distill.train.epoch=3"], {}, "did you mean 'distill.train.epochs'"),
    ("override without =", "run", ["cpu", "distill.train.epochs"], {}, "is not key=value"),
    ("override value not YAML", "run", ["cpu", "distill.train.lr=[1,"], {}, "not valid YAML"),
    ("wrong type", "run", ["cpu", "distill.train.epochs=three"], {}, "distill.train.epochs"),
    ("negative epochs", "run", ["cpu", "distill.train.epochs=-1"], {}, "greater than or equal to 0"),
    ("NaN learning rate", "run", ["cpu", "distill.train.lr=.nan"], {}, "distill.train.lr"),
    ("infinite loss weight", "run", ["cpu", "distill.train.beta=.inf"], {}, "distill.train.beta"),
    ("scalar for a section", "run", ["cpu", "distill.train.pc=3"], {}, "distill.train.pc"),
    ("key below a value", "run", ["cpu", "seed.x=1"], {}, "'seed' is not a section"),
    ("unknown loss", "run", ["cpu", "distill.train.baselines={{pkd: {{}}}}"], {}, "unknown loss 'pkd'"),
    ("unknown loss option", "run", ["cpu", "distill.train.baselines={{kd: {{tmp: 2}}}}"], {}, "kd"),
    ("list for a mapping", "run", ["cpu", "distill.train.baselines=[kd]"], {}, "baselines"),
    ("missing config file", "run", ["cpu", "--config", "{tmp}/nope.yaml"], {}, "no config"),
    ("config is a list", "run", ["cpu", "--config", "{list_yaml}"], {}, "must hold a mapping"),
    ("truncated config", "run", ["cpu", "--config", "{truncated_yaml}"], {}, "not valid YAML"),
    ("image folder missing", "run", ["cpu", *FAST, "data.dataset=imagefolder", "data.root={tmp}/none"], {}, "none"),
    ("corrupt dataset files", "run", ["cpu", *FAST, "data.dataset=mnist"], {"EDGEPC_DATA": "{tmp}/data"}, "mnist"),
    ("teacher checkpoint missing", "run", ["cpu", *FAST, "teacher.checkpoint={tmp}/none.pt"], {}, "cannot load teacher checkpoint"),
    ("checkpoint of random bytes", "run", ["cpu", *FAST, "teacher.checkpoint={random_pt}"], {}, "cannot load teacher checkpoint"),
    ("untrusted pickle checkpoint", "run", ["cpu", *FAST, "teacher.checkpoint={evil_pt}"], {}, "cannot load teacher checkpoint"),
    ("checkpoint of another model", "run", ["cpu", *FAST, "teacher.checkpoint={other_pt}"], {}, "cannot load teacher checkpoint"),
    ("truncated checkpoint", "run", ["cpu", *FAST, "teacher.checkpoint={truncated_pt}"], {}, "cannot load teacher checkpoint"),
    ("cache is a file", "run", ["cpu", *FAST, "--cache", "{a_file}"], {}, "a-file"),
    ("device report not JSON", "ingest", ["{bad_json}"], {}, "not valid JSON"),
    ("device report of wrong shape", "ingest", ["{report_json}"], {}, "is not a device report"),
    ("device report missing", "ingest", ["{tmp}/none.json"], {}, "no report at"),
    ("unknown tracking mode", "run", ["cpu", "tracking.on_error=retry"], {}, "tracking.on_error"),
    ("spool line not JSON", "sync", ["--spool", "{tmp}/spool"], {}, "line 2 of"),
    ("store to sync into down", "sync", ["--spool", "{tmp}/spool-ok", "--uri", "sqlite:////proc/x/m.db"], {}, "run the sync again"),
]  # fmt: skip
MAINS = {"run": run.main, "ingest": ingest.main, "sync": sync.main}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize(("case", "cli", "argv", "env", "says"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_typed_line(
    case, cli, argv, env, says, files, tmp_path, monkeypatch, capsys
):
    names = {re.sub(r"[.-]", "_", k): str(v) for k, v in files.items()}
    names["tmp"] = str(next(iter(files.values())).parent)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(**names))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    argv = [a.format(**names) for a in argv]
    if cli == "run" and "--until" not in argv:  # should a case pass, it must pass quickly
        argv += FAST
    if cli == "run" and "--cache" not in argv:
        argv += ["--cache", str(tmp_path / "cache")]
    assert MAINS[cli](argv) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line: no traceback, no log spill
    assert err[0].startswith("error: "), err[0]
    assert says in err[0], err[0]
    assert not (Path(names["tmp"]) / "pwned").exists()  # the pickle's command never ran
    left = [d.name for d in (tmp_path / "cache").glob("*/") if not any(d.iterdir())]
    assert left == []  # no empty stage folder left behind


@pytest.mark.parametrize(
    "argv",
    [["gpu"], ["cpu", "--profile", "fast"], ["cpu", "--until", "nowhere"], ["cpu", "--bogus"]],
)
def test_bad_command_line_flags_exit_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        run.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("python -m edgepc.pipelines.run: error:")


# ---------------------------------------------------------------------------- fuzzing

KEYS = ["seed", "name", "target", "device", "data.val_fraction", "data.train_limit",
        "teacher.model", "distill.train.epochs", "distill.train.lr", "distill.train.pc.tau",
        "distill.train.baselines", "qat.freeze_observers_epochs", "export.parity_size",
        "validation.latency.threads", "registry.model", "nope", "distill.train.nope"]  # fmt: skip
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(KEYS) | st.text(max_size=20), value=YAML_VALUES | st.text(max_size=30))
def test_fuzzed_overrides_give_a_config_or_a_one_line_config_error(key, value):
    text = (
        value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    )
    message, config = None, None
    try:
        config = load_config("cpu", overrides=[f"{key}={text}"])
    except ConfigError as error:
        message = str(error)
    assert isinstance(config, PipelineConfig) or "\n" not in message


@pytest.fixture(scope="module")
def manifest_text(setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    manifest = bundle(folder, setup, "cpu", "fp32")
    return folder / manifest.name


def _paths(node, prefix=()):
    yield prefix
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in children:
        yield from _paths(child, (*prefix, key))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_manifests_are_read_or_refused_with_a_bundle_error(manifest_text, data):
    original = json.loads((manifest_text / MANIFEST).read_text())
    edited = json.loads(json.dumps(original))
    paths = [p for p in _paths(edited) if p]
    for path in data.draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3)):
        parent = edited
        try:
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()):
                parent[path[-1]] = data.draw(YAML_VALUES)
            elif isinstance(parent, dict):
                del parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this path
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "b"
        shutil.copytree(manifest_text, folder)
        raw = data.draw(st.sampled_from(["json", "bytes"]))
        if raw == "json":
            (folder / MANIFEST).write_text(json.dumps(edited))
        else:
            (folder / MANIFEST).write_bytes(data.draw(st.binary(max_size=200)))
        message, manifest = None, None
        try:
            manifest = read_manifest(folder)
        except BundleError as error:
            message = str(error)
    if manifest is None:
        assert "\n" not in message
    else:  # accepted: a JSON edit that kept it valid (the files were checked by digest)
        assert raw == "json"


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=600) | st.binary(max_size=200).map(lambda b: b"\x80\x02" + b))
def test_fuzzed_teacher_checkpoints_are_refused_in_one_line(payload):
    """Any bytes as a teacher checkpoint (raw, or behind a pickle header): a ModelError of one
    line, whatever torch's unpickler raised (random bytes once gave IndexError)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "teacher.pt"
        path.write_bytes(payload)
        with pytest.raises(ModelError, match=r"^cannot load teacher checkpoint") as error:
            load_weights(build_model("tiny_cnn").model, path, "tiny_cnn")
    assert "\n" not in str(error.value)
