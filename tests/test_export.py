"""Bundles for each target run in their real runtimes and match PyTorch; manifests, the parity
check, the latency timer, the accuracy gate and the Jetson engine builder's refusals."""

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from edgepc.distill.images import Normalisation
from edgepc.export.bundle import (
    MANIFEST,
    TESTSET,
    BundleError,
    read_manifest,
)
from edgepc.export.parity import parity, violations
from edgepc.export.runtimes import open_runtime
from edgepc.export.tensorrt import check_onnx
from edgepc.measure import interleaved_latency, interleaved_latency_by_threads, latency
from edgepc.pipelines.config import load_config
from edgepc.pipelines.deploy import (
    ValidationGateError,
    validate_bundle,
    validate_stage,
    validation_table,
)
from edgepc.pipelines.stages import EmbeddingFacts, ExportFacts, Output, StageContext
from edgepc.targets import TARGETS
from edgepc_device.bundle import normalise
from edgepc_device.runtimes import onnx_session_options, x86_without_vnni
from tests.conftest import bundle

CPU = torch.device("cpu")
PROJECT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cpu", "mobile", "jetson"])
def test_each_writer_matches_pytorch_in_its_runtime(tmp_path, setup, target):
    model, int8, testset, spec, _ = setup
    bounds = load_config(target).export
    x = normalise(np.load(testset)["images"], spec.mean, spec.std)
    sizes = {}
    for source in ("fp32", "ptq"):
        manifest = bundle(tmp_path, setup, target, source)
        folder = tmp_path / manifest.name
        path = folder / manifest.model
        torch_model = model if source == "fp32" else int8[target]
        with torch.no_grad():
            reference = tuple(t.numpy() for t in torch_model(torch.from_numpy(x)))
        runtime = open_runtime(path, threads=1)
        got = runtime.predict(x)
        row = parity(reference, got)
        assert violations(row, bounds.fp32_parity if source == "fp32" else bounds.int8_parity) == []
        if source == "fp32":
            assert row["top1_agreement"] == 1.0
            assert row["max_logit_delta"] < 1e-4
        sizes[source] = path.stat().st_size
        if path.suffix == ".onnx":  # the graph alone: no exporter text (signature, stack traces)
            graph = onnx.load(path).graph
            assert not graph.metadata_props
            assert not graph.value_info
            assert not any(n.metadata_props or n.doc_string for n in graph.node)
            zero_points = [n.input[2] for n in graph.node if n.op_type == "DequantizeLinear"]
            assert len(set(zero_points)) == len(zero_points)  # none shared (see exact kernels)
        assert read_manifest(folder) == manifest  # every sha256 checks out
        if target == "mobile" and source == "ptq":
            assert manifest.input.dtype == "int8"
            assert manifest.input.quantization is not None
            assert runtime.max_batch == 1
            assert runtime.input_quantization is not None
            assert all(o.dtype == "int8" for o in manifest.outputs)  # full integer
        if target == "jetson" and source == "ptq":
            assert check_onnx(path)["per_channel"] == 5  # int8 weights of 3 convs + 2 linears
            assert manifest.input.quantization.zero_point == 0
        if path.suffix == ".onnx" and source == "ptq":
            # onnxruntime's exact int8 kernels (what x86 CPUs without VNNI get) take the file
            # and compute the PyTorch graph's numbers
            options = onnx_session_options(threads=1, exact=True)
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            exact = session.run(["logits"], {"images": x})[0]
            assert np.abs(exact - reference[0]).max() < 0.02 * np.abs(reference[0]).max()
        if target == "cpu" and source == "ptq":
            stored = onnx.load(path)
            weights = [numpy_helper.to_array(i) for i in stored.graph.initializer]
            assert sum(w.size for w in weights if w.dtype == np.int8) > 0.95 * sum(
                p.numel() for p in model.parameters() if p.ndim > 1
            )
            # The same graph with float weights behind Q/DQ pairs computes the same numbers.
            qdq = open_runtime(write_qdq(tmp_path, int8["cpu"], x[:2]), threads=1).predict(x)
            np.testing.assert_allclose(got[0], qdq[0], atol=1e-5)
    assert sizes["ptq"] < 0.4 * sizes["fp32"] or target == "jetson"


def test_exact_int8_kernels_are_asked_for_exactly_where_vnni_is_missing(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cases = {
        "flags\t\t: fpu sse4_2 avx avx2 fma\n": True,  # AVX2 only: saturating uint8 × int8
        "flags\t\t: avx2 avx512f avx512bw\n": True,  # AVX-512 without VNNI
        "flags\t\t: avx2 avx512f avx512_vnni\n": False,
        "flags\t\t: avx2 avx_vnni\n": False,
        "model name\t: some CPU\n": True,  # no flags line: cannot tell, exact is always right
    }
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    for text, expected in cases.items():
        cpuinfo.write_text(text)
        assert x86_without_vnni(cpuinfo) is expected, text
    assert x86_without_vnni(tmp_path / "absent") is True
    monkeypatch.setattr("platform.machine", lambda: "aarch64")  # ARM: no such kernels
    assert x86_without_vnni(tmp_path / "absent") is False
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    key = "session.x64quantprecision"
    monkeypatch.setattr("edgepc_device.runtimes.x86_without_vnni", lambda: True)
    assert onnx_session_options(1).get_session_config_entry(key) == "1"
    monkeypatch.setattr("edgepc_device.runtimes.x86_without_vnni", lambda: False)
    with pytest.raises(RuntimeError, match="does not have configuration"):
        onnx_session_options(1).get_session_config_entry(key)  # unset: the fast kernels


def write_qdq(tmp_path, graph, example):
    from edgepc.export.writers import write_onnx

    return write_onnx(graph, torch.from_numpy(example), tmp_path / "qdq.onnx")


@pytest.mark.slow
def test_manifest_round_trip_and_every_corruption_is_named(tmp_path, setup):
    manifest = bundle(tmp_path, setup, "cpu", "fp32")
    folder = tmp_path / manifest.name
    text = (folder / MANIFEST).read_text()
    assert read_manifest(folder) == manifest
    assert manifest.input.shape == ["batch", 1, 28, 28]
    assert manifest.input.layout == "NCHW"
    assert [o.name for o in manifest.outputs] == ["logits", "embedding"]
    assert manifest.classes[0] == "T-shirt/top"
    assert manifest.runtime == "onnxruntime"

    def broken(edit) -> str:
        data = json.loads(text)
        edit(data)
        (folder / MANIFEST).write_text(json.dumps(data))
        with pytest.raises(BundleError) as error:
            read_manifest(folder)
        return str(error.value)

    assert "not a plain file name" in broken(lambda d: d["files"][0].update(path="../x.onnx"))
    assert "lists no file 'model.tflite'" in broken(lambda d: d.update(model="model.tflite"))
    assert "precision" in broken(lambda d: d.update(precision="int4"))
    assert "extra" in broken(lambda d: d.update(surprise=1)).lower()
    (folder / MANIFEST).write_text(text[:100])
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(folder)
    (folder / MANIFEST).write_text(text)
    model = folder / manifest.model
    model.write_bytes(model.read_bytes()[:-1] + b"\0")  # same size, one byte changed
    with pytest.raises(BundleError, match="does not match its sha256"):
        read_manifest(folder)
    assert read_manifest(folder, verify=False) == manifest
    (folder / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        read_manifest(folder)


def test_normalise_is_bit_identical_to_torch():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    norm = Normalisation((0.1, 0.2, 0.3), (0.5, 0.25, 0.2))
    got = normalise(images.numpy(), list(norm.mean), list(norm.std))
    assert np.array_equal(got, norm.apply(images).numpy())


def test_parity_metrics_and_their_bounds():
    rng = np.random.default_rng(0)
    logits, emb = rng.standard_normal((200, 10)), rng.standard_normal((200, 8))
    same = parity((logits, emb), (logits.copy(), emb.copy()))
    assert same["top1_agreement"] == 1.0
    assert same["max_logit_delta"] == 0.0
    assert same["pc_triplet_agreement"] == 1.0
    assert violations(same, load_config("cpu").export.fp32_parity) == []
    shuffled = parity((logits, emb), (logits[::-1].copy(), emb[::-1].copy()))
    assert shuffled["top1_agreement"] < 0.3
    assert shuffled["pc_triplet_agreement"] < 0.7
    broken = violations(shuffled, load_config("cpu").export.int8_parity)
    assert [b.split()[0] for b in broken] == [
        "top1_agreement", "pc_triplet_agreement", "max_logit_delta"]  # fmt: skip


def test_latency_timer_counts_and_orders():
    calls = []
    timed = latency(lambda: calls.append(1), warmup=3, iterations=50)
    assert len(calls) == 53
    assert timed.warmup == 3
    assert timed.iterations == 50
    assert 0 < timed.p50_ms <= timed.p90_ms <= timed.p99_ms
    assert timed.throughput == pytest.approx(1000 / timed.mean_ms)
    with pytest.raises(ValueError, match="at least 2"):
        latency(lambda: None, iterations=1)


def test_interleaved_latency_takes_turns_of_block_calls_and_counts_every_call():
    order = []
    fns = {key: functools.partial(order.append, key) for key in "abc"}
    timed = interleaved_latency(fns, warmup=2, iterations=7, block=3)
    assert "".join(order[:6]) == "aabbcc"  # warm-up
    calls = "".join(order[6:])
    assert len(calls) == 21
    turns = [calls[i : i + 3] for i in range(0, 18, 3)] + list(calls[18:])  # 7 = 3 + 3 + 1
    assert all(len(set(turn)) == 1 for turn in turns)
    rounds = ["".join(turn[0] for turn in turns[i : i + 3]) for i in (0, 3, 6)]
    assert all(sorted(r) == list("abc") for r in rounds)  # every fn once per round
    assert len(set(rounds)) > 1  # in an order shuffled per round
    assert {key: t.iterations for key, t in timed.items()} == dict.fromkeys("abc", 7)
    with pytest.raises(ValueError, match="at least 2 timed iterations"):
        interleaved_latency({"a": lambda: None}, iterations=1)
    with pytest.raises(ValueError, match="block 0"):
        interleaved_latency({"a": lambda: None}, iterations=4, block=0)


def test_interleaved_latency_by_threads_times_one_thread_count_after_the_other():
    order = []
    fns = {key: functools.partial(order.append, key) for key in [("a", 1), ("b", 2), ("c", 1)]}
    timed = interleaved_latency_by_threads(fns, warmup=1, iterations=4, block=2)
    threads = [count for _, count in order]
    assert threads == [1] * 10 + [2] * 5  # a, c: 1 + 4 calls each; then b
    assert set(timed) == set(fns)


@pytest.mark.slow
def test_validate_measures_the_bundles_and_the_gate_fails_clearly(tmp_path, setup):
    manifests = [bundle(tmp_path, setup, "cpu", source) for source in ("fp32", "ptq")]
    folder = tmp_path / manifests[1].name
    row = validate_bundle(folder)
    x = normalise(np.load(folder / TESTSET)["images"], *setup[3].model_dump().values())
    logits, _ = open_runtime(folder / manifests[1].model).predict(x)
    labels = np.load(folder / TESTSET)["labels"]
    assert row["test_top1"] == float((logits.argmax(1) == labels).mean())  # same runtime
    assert row["size_mb"] == (folder / manifests[1].model).stat().st_size / 2**20
    from edgepc.pipelines.config import load_config

    latency = "validation.latency={warmup: 1, iterations: 6, block: 2}"
    config = load_config("cpu", overrides=[latency])
    names = [m.name for m in manifests]
    export = Output({}, {n: n for n in names}, ExportFacts("cpu", names, {}), tmp_path)
    ctx = StageContext(tmp_path / "validate", CPU, lambda m, s: None, False)
    ctx.workdir.mkdir()

    def distill(top1: float) -> Output:
        return Output({"test_top1": top1}, {}, EmbeddingFacts("tiny_cnn", 8), tmp_path)

    result = validate_stage(config.validation, distill(row["test_top1"]), export, ctx)
    metrics = result.metrics
    assert metrics["int8_test_top1"] == row["test_top1"]
    assert metrics["int8_drop_points"] == 0.0
    for t in (1, 2):  # the ratio is of the same run's p50s; fp32 against itself is 1
        assert metrics[f"int8_speed_vs_fp32_{t}t"] == metrics[f"fp32_p50_ms_{t}t"] / metrics[
            f"int8_p50_ms_{t}t"]  # fmt: skip
        assert metrics[f"fp32_speed_vs_fp32_{t}t"] == 1.0
    table = result.facts.table
    speed = metrics["int8_speed_vs_fp32_1t"]
    assert f"| {speed:.2f}× |" in table
    slower = "**int8 is slower than fp32 here**" in table
    assert slower == any(metrics[f"int8_speed_vs_fp32_{t}t"] < 1 for t in (1, 2))
    # An fp32 student 5 points better than the weaker file: the gate stops the pipeline there.
    weaker = min(("fp32", "int8"), key=lambda p: metrics[f"{p}_test_top1"])
    top1 = metrics[f"{weaker}_test_top1"] + 0.05
    gate = rf"cpu-{weaker} loses 5.00 top-1 points .*validation.max_drop = 1.0"
    with pytest.raises(ValidationGateError, match=gate):
        validate_stage(config.validation, distill(top1), export, ctx)


def test_the_validation_table_says_plainly_when_int8_is_slower():
    row = {"test_top1": 0.9, "drop_points": 0.0, "test_pc_triplet_agreement": 0.8, "size_mb": 1.0,
           "p50_ms_1t": 1.0, "p99_ms_1t": 2.0}  # fmt: skip
    rows = {"cpu-fp32": row | {"speed_vs_fp32_1t": 1.0},
            "cpu-int8": row | {"speed_vs_fp32_1t": 0.8}}  # fmt: skip
    table = validation_table(rows, 0.9, [1], 1.0)
    assert "**int8 is slower than fp32 here**: cpu-int8 at 1 thread (0.80×)." in table
    rows["cpu-int8"]["speed_vs_fp32_1t"] = 1.25
    table = validation_table(rows, 0.9, [1], 1.0)
    assert "| 1.25× |" in table
    assert "slower" not in table
    assert "Every int8 artifact is faster than its fp32 sibling" in table


def test_the_validation_table_gives_no_verdict_from_a_host_that_is_not_the_device():
    row = {"test_top1": 0.9, "drop_points": 0.0, "test_pc_triplet_agreement": 0.8, "size_mb": 1.0,
           "p50_ms_1t": 1.0, "p99_ms_1t": 2.0}  # fmt: skip
    rows = {"jetson-fp32": row | {"speed_vs_fp32_1t": 1.0},
            "jetson-int8": row | {"speed_vs_fp32_1t": 0.25}}  # fmt: skip
    table = validation_table(rows, 0.9, [1], 1.0, host_is_device=False)
    assert "slower" not in table
    assert "faster" not in table
    assert "no verdict on int8 there" in table
    assert [name for name, t in TARGETS.items() if t.host_is_device] == ["cpu"]
