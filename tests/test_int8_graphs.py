"""What each runtime executes from edgepc's int8 files, for every zoo student: the structure that
makes int8 fast, read from the runtime (no timing; benchmarks/int8_speed.py times it).

The students are the benchmark's own (seeded weights, batch-norm statistics away from the
identity), so these tests check the graphs whose speed the benchmark reports.
"""

import platform
from collections import Counter

import numpy as np
import pytest
import torch

from edgepc.export.inspect import (
    float_compute,
    integer_weight_types,
    litert_plan,
    onnxruntime_ops,
)
from edgepc.export.tensorrt import check_onnx
from edgepc.export.writers import write_tflite
from edgepc.models import MODELS, build_model
from edgepc.quant import convert, prepare
from edgepc.targets import TARGETS as TARGETS
from edgepc_device.runtimes import onnx_session_options
from tests.conftest import benchmark_script

QUANTIZE = "quantized_decomposed.quantize_per_"
# A student that is another one at a different width has the same layers, hence the same int8
# graph (checked below); its graphs are built again only with -m exhaustive.
SAME_LAYERS = {"mobilenetv2_1.0": "mobilenetv2_0.5"}
STUDENTS = [
    pytest.param(name, marks=pytest.mark.exhaustive) if name in SAME_LAYERS else name
    for name, spec in MODELS.items()
    if spec.role == "student"
]


@pytest.fixture(scope="module")
def speed():
    return benchmark_script("int8_speed")


def int8_file(speed, name: str, target: str, folder, weight_bits: int = 8):
    """(the fp32 student, its PTQ int8 graph for ``target``, the int8 file written from it)"""
    model, images = speed.network(name)
    quant = prepare(model, target, images, qat=False, weight_bits=weight_bits)
    quant.calibrate([images])
    graph = convert(quant)
    return model, graph, TARGETS[target].write(graph, images[:2], folder, True)


def convs(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def linears(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def layers(name: str) -> list[tuple]:
    """Each module's kind and what decides its int8 kernel (kernel, stride, depthwise), no
    widths."""
    described = []
    for module in build_model(name).modules():
        kind = (type(module).__name__,)
        if isinstance(module, torch.nn.Conv2d):
            depthwise = module.groups == module.in_channels
            kind += (module.kernel_size, module.stride, depthwise)
        described.append(kind)
    return described


@pytest.mark.parametrize(("wider", "name"), SAME_LAYERS.items())
def test_a_wider_student_has_the_same_layers(wider, name):
    assert layers(wider) == layers(name)
    assert len(layers(name)) > 100  # a real network, not an empty comparison


def test_onnxruntime_ops_shows_float_convs_of_an_fp32_graph(tmp_path, speed):
    model, images = speed.network("tiny_cnn")
    ops = onnxruntime_ops(TARGETS["cpu"].write(model, images[:2], tmp_path, False))
    expected = {"com.microsoft.nchwc.Conv": 3, "com.microsoft.FusedGemm": 1, "Gemm": 1}
    assert float_compute(ops) == expected, ops  # 3 convs, the linear + ReLU, the classifier


@pytest.mark.parametrize("name", STUDENTS)
def test_cpu_int8_runs_every_conv_linear_and_add_as_an_int8_kernel(tmp_path, speed, name):
    model, graph, path = int8_file(speed, name, "cpu", tmp_path)
    ops = onnxruntime_ops(path)
    assert not float_compute(ops), ops  # no float islands
    assert ops["com.microsoft.QLinearConv"] == convs(model)
    assert ops["com.microsoft.QGemm"] == linears(model)
    assert ops["Clip"] == ops["Relu"] == 0, ops  # every clamp folded into a quantized range
    assert ops["Add"] == 0, ops  # residual adds: QLinearAdd
    # NCHW <-> NHWC at the graph's two ends and before the int8 global pool, and around each
    # ShuffleNet channel shuffle (a 5-D transpose that the NHWC kernels cannot cross; the fp32
    # graph reorders there too)
    shuffles = sum(n.target is torch.ops.aten.transpose.int for n in graph.graph.nodes)
    assert ops["Transpose"] <= 3 + 3 * shuffles, ops
    # the global pool in int8, but ShuffleNetV2's x.mean([2, 3]) keeps no dims: a ReduceMean
    assert ops["com.microsoft.QLinearGlobalAveragePool"] == int(name != "shufflenetv2_0.5"), ops
    # float only at the ends: input, the two outputs, the global poolings before them
    assert ops["QuantizeLinear"] + ops["DequantizeLinear"] <= 8, ops


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="onnxruntime widens int8 weights for its exact kernels on x86 only",
)
def test_7_bit_cpu_weights_keep_onnxruntimes_fast_kernels_and_its_exact_results(tmp_path, speed):
    """On x86, onnxruntime's exact int8 mode (what CPUs without VNNI need) moves every 8-bit
    weight to its slower uint8 × uint8 kernels; 7-bit weights stay int8 on the fast kernels,
    and there those kernels give the exact results (no saturated pair sums)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    files = {}
    for bits in (8, 7):
        folder = tmp_path / str(bits)
        model, _, files[bits] = int8_file(speed, "tiny_cnn", "cpu", folder, bits)
    integer_ops = convs(model) + linears(model)
    assert integer_weight_types(files[8]) == Counter(uint8=integer_ops)  # widened: slow kernels
    assert integer_weight_types(files[7]) == Counter(int8=integer_ops)  # kept: fast kernels
    stored = [numpy_helper.to_array(i) for i in onnx.load(files[7]).graph.initializer]
    weights = [w for w in stored if w.dtype == np.int8 and w.ndim > 1]
    assert len(weights) == integer_ops
    assert max(int(np.abs(w.astype(int)).max()) for w in weights) == 63
    x = np.random.default_rng(0).standard_normal((32, 1, 28, 28), dtype=np.float32)
    logits = [
        ort.InferenceSession(str(files[7]), onnx_session_options(1, exact),
                             providers=["CPUExecutionProvider"]).run(["logits"], {"images": x})[0]
        for exact in (True, False)
    ]  # fmt: skip
    np.testing.assert_array_equal(logits[0], logits[1])  # the same kernels: bit for bit


@pytest.mark.parametrize("name", STUDENTS)
def test_mobile_int8_is_taken_whole_by_xnnpack_with_constant_int8_filters(tmp_path, speed, name):
    model, _, path = int8_file(speed, name, "mobile", tmp_path)
    plan = litert_plan(path)
    assert plan.delegated_whole_graph, plan.ops
    assert plan.constant_transforms == []  # no weight transposed or dequantized at run time
    assert plan.float_weights == []
    assert plan.ops["CONV_2D"] + plan.ops["DEPTHWISE_CONV_2D"] == convs(model)
    assert plan.float_ops == []  # full integer: int8 from input to outputs


@pytest.mark.parametrize("name", STUDENTS)
def test_jetson_int8_passes_the_tensorrt_rules(tmp_path, speed, name):
    model, _, path = int8_file(speed, name, "jetson", tmp_path)
    counts = check_onnx(path)  # Q/DQ pairs, zero-point 0, weights per channel on axis 0
    assert counts["per_channel"] == convs(model) + linears(model)  # a DQ per int8 weight
    fp32 = TARGETS["jetson"].write(model, speed.network(name)[1][:2], tmp_path / "fp32", False)
    assert path.stat().st_size < 0.4 * fp32.stat().st_size  # int8 weights, not float behind Q/DQ


def test_litert_plan_sees_ops_that_xnnpack_leaves_out(tmp_path):
    class Cumsum(torch.nn.Module):
        def forward(self, x):
            y = torch.nn.functional.conv2d(x, torch.ones(4, 1, 3, 3))
            return y.cumsum(1), y.relu()

    path = write_tflite(Cumsum(), torch.randn(1, 1, 8, 8), tmp_path / "m.tflite", False)
    plan = litert_plan(path)
    assert plan.ops["CUMSUM"] == 1
    assert not plan.delegated_whole_graph  # XNNPACK has no cumulative sum
    assert [op.split("#")[0] for op in plan.float_weights] == ["DEPTHWISE_CONV_2D"]
    assert any(op.startswith("CUMSUM#") for op in plan.float_ops)


def test_qat_and_ptq_quantize_the_same_places(speed):
    """QAT fake-quantizes exactly where PTQ observes, so trained scales are the exported ones."""
    model, images = speed.network("mobilenetv2_0.5")

    def quantize_ops(qat: bool) -> tuple[list[str], int]:
        """(what each activation quantize reads, in order; the number of quantized weights)"""
        quant = prepare(model, "cpu", images, qat=qat)
        quant.calibrate([images])
        nodes = [n for n in convert(quant).graph.nodes if str(n.target).startswith(QUANTIZE)]
        activations = [str(n.args[0].target) for n in nodes if "per_tensor" in str(n.target)]
        return activations, sum("per_channel" in str(n.target) for n in nodes)

    ptq, qat = quantize_ops(False), quantize_ops(True)
    plans = [prepare(model, "cpu", images, qat=qat).plan for qat in (False, True)]
    assert plans[0] == plans[1]  # a training graph's batch-norm counters are no layers
    sources = Counter(ptq[0])
    assert sources["aten.hardtanh_.default"] == 35  # after each of the 35 ReLU6, not before
    assert sources["aten.conv2d.default"] == 52 - 35  # the convs with no clamp after them
    assert sources["aten.add.Tensor"] == 10  # residual adds
    assert ptq[1] == 52 + 1  # conv and linear weights
    assert ptq == qat


def test_int8_speed_writes_its_table_with_ratios(tmp_path, speed):
    result = speed.main(["--nets", "tiny_cnn", "--threads", "1", "--block", "2",
                         "--iterations", "5", "--warmup", "1", "--out", str(tmp_path)])  # fmt: skip
    rows = {(r["runtime"], r["variant"]): r for r in result["rows"]}
    bits = {key: row["weight_bits"] for key, row in rows.items()}
    assert bits == {
        ("onnxruntime", "fp32"): None, ("onnxruntime", "int8 ptq"): 7,
        ("onnxruntime", "int8 qat"): 7, ("onnxruntime", "int8 ptq 8-bit"): 8,
        ("onnxruntime", "int8 ort quantize_static"): 8,
        ("onnxruntime", "int8 ort quantize_static reduce_range"): 7,
        ("LiteRT", "fp32"): None, ("LiteRT", "int8 ptq"): 8, ("LiteRT", "int8 qat"): 8,
    }  # fmt: skip
    for (runtime, variant), row in rows.items():
        fp32 = rows[runtime, "fp32"]
        assert row["speed_vs_fp32_1t"] == pytest.approx(fp32["p50_ms_1t"] / row["p50_ms_1t"])
        assert row["iterations_1t"] == 5
        if variant != "fp32":
            assert row["fp32_size_ratio"] > 2.0  # int8 weights
    weights = sum(p.numel() for p in build_model("tiny_cnn", 10, 1).parameters() if p.ndim > 1)
    for variant in ("fp32", "int8 ptq"):  # where a LiteRT file's bytes go, summing to its size
        parts = rows["LiteRT", variant]["bytes"]
        assert sum(parts.values()) == round(rows["LiteRT", variant]["size_mb"] * 2**20)
        assert parts["other"] >= 0
        if variant == "fp32":
            assert parts["float32"] >= 4 * weights
            assert parts.get("int8", 0) == parts["quantization"] == 0
        else:
            assert weights <= parts["int8"] < weights + 1000  # + the int8 constants, if any
            assert parts.get("float32", 0) == 0  # full integer
            assert parts["quantization"] > 0
    table = (tmp_path / "int8_speed.md").read_text()
    assert "| tiny_cnn | 1×28×28 | onnxruntime | int8 ptq | 7 |" in table
    assert "| tiny_cnn | int8 ptq |" in table  # the size table
    for variant, control in (("int8 ptq", "int8 ort quantize_static reduce_range"),
                             ("int8 ptq 8-bit", "int8 ort quantize_static")):  # fmt: skip
        expected = (
            rows["onnxruntime", control]["p50_ms_1t"] / rows["onnxruntime", variant]["p50_ms_1t"]
        )
        assert rows["onnxruntime", variant]["speed_vs_control_1t"] == pytest.approx(expected)
    assert "speed_vs_control_1t" not in rows["LiteRT", "int8 ptq"]


def test_int8_profile_groups_onnxruntimes_node_times_by_op_and_conv_kind(tmp_path, speed):
    profile = benchmark_script("int8_profile")  # imports int8_speed, registered by ``speed``
    import onnx
    from onnx import helper

    from edgepc.export.speed_plan import conv_kinds

    def conv(name, op, weight, group=1, domain=""):
        inputs = ["x", "s", "z", name] if op == "QLinearConv" else ["x", name]
        return helper.make_node(op, inputs, [f"{name}.y"], name=name, group=group, domain=domain)

    nodes = [conv("dw", "Conv", [8, 1, 3, 3], group=8), conv("pw", "Conv", [16, 8, 1, 1]),
             conv("first", "QLinearConv", [8, 1, 3, 3], domain="com.microsoft"),
             helper.make_node("Relu", ["x"], ["r"], name="relu")]  # fmt: skip
    weights = [helper.make_tensor(n, onnx.TensorProto.FLOAT, dims, np.zeros(np.prod(dims)))
               for n, dims in (("dw", [8, 1, 3, 3]), ("pw", [16, 8, 1, 1]),
                               ("first", [8, 1, 3, 3]))]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [], [], initializer=weights)
    assert conv_kinds(graph) == {"dw": "Conv depthwise", "pw": "Conv 1×1",
                                         "first": "QLinearConv other", "relu": "Relu"}  # fmt: skip
    result = profile.main(["--nets", "tiny_cnn", "--runs", "4", "--warmup", "1", "--layers",
                           "conv3x3", "--layer-iterations", "4",
                           "--out", str(tmp_path)])  # fmt: skip
    by_file = result["results"]["tiny_cnn"]
    assert set(by_file) == {"fp32", "int8 7-bit", "int8 8-bit"}
    for label, times in by_file.items():
        ops = {k: v for k, v in times.items() if not k.startswith("(")}
        assert times["(all nodes)"] == pytest.approx(sum(ops.values()))
        assert times["(whole run)"] >= times["(all nodes)"]  # nodes run inside the run
        convs_here = sorted(k for k in ops if "Conv" in k)
        if label == "fp32":
            assert convs_here == ["Conv other"], ops  # 3 × 3 convs
        else:
            assert convs_here == ["QLinearConv other"], ops
    assert "| QLinearConv other |" in (tmp_path / "int8_profile.md").read_text()
    assert [(r["layer"], r["runtime"]) for r in result["layers"]] == [
        ("3×3 conv 16→16", "onnxruntime"), ("3×3 conv 16→16", "LiteRT")]  # fmt: skip
    for row in result["layers"]:
        assert row["speed"] == pytest.approx(row["fp32_ms"] / row["int8_ms"])


class Families(torch.nn.Module):
    """One of each layer family of MobileNetV3, EfficientNet and RegNetY: HardSwish, a
    squeeze-excitation block with a HardSigmoid gate, SiLU, one with a Sigmoid gate, a
    concatenation, global means."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

        self.stem = Conv2dNormActivation(3, 16, 3, stride=2, activation_layer=torch.nn.Hardswish)
        self.se_hard = SqueezeExcitation(16, 8, scale_activation=torch.nn.Hardsigmoid)
        self.expand = Conv2dNormActivation(16, 16, 3, activation_layer=torch.nn.SiLU)
        self.se = SqueezeExcitation(16, 8, activation=torch.nn.SiLU)  # Sigmoid gate
        self.branch = Conv2dNormActivation(16, 16, 1)  # ReLU
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = self.se_hard(self.stem(x))
        y = self.se(self.expand(x))
        return self.fc(self.pool(torch.cat([y, self.branch(x)], 1)).flatten(1))


@pytest.fixture(scope="module")
def families():
    from edgepc.models import EmbeddingModel

    torch.manual_seed(0)
    model = EmbeddingModel(Families(), "pool")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(32, 3, 32, 32)


def families_int8(families, target, folder):
    """(the quantized model with its plan, the int8 graph, its file, the layers left float)"""
    model, images = families
    quant = prepare(model, target, images, qat=False)
    quant.calibrate([images])
    graph = convert(quant)
    path = TARGETS[target].write(graph, images[:2], folder, True)
    floats = {layer.layer: layer.reason for layer in quant.plan.float_layers}
    return quant, graph, path, floats


def assert_parity(target, graph, path, images):
    """The runtime reproduces the int8 graph within the target's own int8 bounds."""
    from edgepc.export.parity import parity
    from edgepc.export.runtimes import open_runtime

    with torch.no_grad():
        reference = tuple(t.numpy() for t in graph(images))
    row = parity(reference, open_runtime(path).predict(images.numpy()))
    bounds = TARGETS[target].int8_parity
    assert row["top1_agreement"] >= bounds.top1_agreement, row
    assert row["max_logit_delta"] <= bounds.max_logit_delta, row


def test_cpu_runs_sigmoid_silu_and_gates_as_int8_kernels_and_hard_activations_in_float(
    tmp_path, families
):
    """onnxruntime has QLinearSigmoid and QLinearMul (SiLU is split into both) and
    QLinearGlobalAveragePool (a global mean is written as one), but no int8 HardSwish,
    HardSigmoid or ReduceMean: those run in float, and the plan says so."""
    quant, graph, path, floats = families_int8(families, "cpu", tmp_path)
    ops = onnxruntime_ops(path)
    assert not float_compute(ops), ops
    assert ops["com.microsoft.QLinearConv"] == 7, ops  # stem, 2 × 2 gate convs, expand, branch
    assert ops["com.microsoft.QLinearSigmoid"] == 3, ops  # the gate, 2 SiLU
    assert ops["com.microsoft.QLinearMul"] == 4, ops  # 2 gates, 2 SiLU
    assert ops["com.microsoft.QLinearConcat"] == 1, ops
    assert ops["Sigmoid"] == 0, ops
    assert ops["HardSigmoid"] == 2, ops  # HardSwish = x · HardSigmoid(x), and the gate
    reason = "no int8 kernel in onnxruntime"
    assert ops["com.microsoft.QLinearGlobalAveragePool"] == 2, ops  # after SiLU, after cat
    # the mean after HardSwish has a float input; the embedding's mean keeps no dims
    assert floats == {"stem.2": reason, "se_hard.scale_activation": reason,
                      "se_hard.avgpool": reason, "": reason}, floats  # fmt: skip
    assert quant.plan.summary().startswith(f"int8 layers: {len(quant.plan.layers) - 4} of ")
    assert_parity("cpu", graph, path, families[1])


def test_mobile_takes_every_family_whole_in_xnnpack_as_int8(tmp_path, families):
    """XNNPACK has no int8 HARD_SWISH (TFLite's own kernel would split the delegate) and
    TFLite no HardSigmoid: both are written as int8 ADD / MUL, so one delegate runs it all."""
    _, graph, path, floats = families_int8(families, "mobile", tmp_path)
    plan = litert_plan(path)
    assert plan.delegated_whole_graph, plan.ops
    assert plan.float_ops == plan.float_weights == plan.constant_transforms == []
    assert (plan.ops["HARD_SWISH"], plan.ops["LOGISTIC"]) == (0, 3), plan.ops
    assert plan.ops["CONV_2D"] + plan.ops["DEPTHWISE_CONV_2D"] == 7, plan.ops
    assert floats == {}
    assert_parity("mobile", graph, path, families[1])


def test_jetson_leaves_point_wise_families_to_tensorrt(tmp_path, families):
    """TensorRT's Q/DQ go where NVIDIA places them (inputs of convs, linears, adds); it fuses
    the activations and gates in between itself."""
    _, graph, path, floats = families_int8(families, "jetson", tmp_path)
    counts = check_onnx(path)
    assert counts["per_channel"] == 7 + 1  # an int8 weight per conv and linear
    reason = TARGETS["jetson"].recipe.float_reason
    assert {layer for layer, why in floats.items() if why == reason} == {
        "stem.2", "se_hard", "se_hard.scale_activation", "expand.2", "se", "se.activation",
        "se.scale_activation"}  # fmt: skip
    assert_parity("jetson", graph, path, families[1])


@pytest.mark.parametrize("target", ["cpu", "mobile"])
def test_mobilenet_v3_small_int8(tmp_path, target):
    """torchvision's MobileNetV3-Small, as a student names it: every conv int8; on mobile every
    layer, in one XNNPACK delegate; on cpu only its hard activations and means in float."""
    from edgepc.models.specs import model_from_spec

    torch.manual_seed(0)
    model, _ = model_from_spec("torchvision:mobilenet_v3_small", 10, 3, 96)
    images = torch.randn(8, 3, 96, 96)
    quant = prepare(model.eval(), target, images, qat=False)
    quant.calibrate([images])
    path = TARGETS[target].write(convert(quant), images[:2], tmp_path, True)
    float_ops = Counter(layer.ops[0] for layer in quant.plan.float_layers)
    if target == "cpu":
        # the means after HardSwish (float); the one after a ReLU is int8
        assert float_ops == {"hardswish": 19, "hardsigmoid": 9, "mean": 9}, float_ops
        assert onnxruntime_ops(path)["com.microsoft.QLinearConv"] == convs(model)
    else:
        assert float_ops == {}
        plan = litert_plan(path)
        assert plan.delegated_whole_graph, plan.ops
        assert plan.float_ops == []
        assert plan.ops["CONV_2D"] + plan.ops["DEPTHWISE_CONV_2D"] == convs(model)
