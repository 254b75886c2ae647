"""Int8 recipes, QAT/PTQ and the conversion to real int8 artifacts, on real Fashion-MNIST."""

import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgepc.coherence import perception_coherence_loss
from edgepc.distill.evaluate import predict, top1
from edgepc.distill.trainer import TrainConfig, train
from edgepc.errors import QuantError, TrainingError
from edgepc.export.tensorrt import check_onnx
from edgepc.export.writers import write_onnx, write_tflite
from edgepc.models import EmbeddingModel, build_model
from edgepc.quant import convert, prepare, quantized, restore
from edgepc.quant.finetune import Split, ptq, qat, score

CPU = torch.device("cpu")
QUANT_OPS = "quantized_decomposed"


@pytest.fixture(scope="module")
def data(tiny):
    return tiny.x, tiny.y, tiny.test_x, tiny.test_y, tiny.norm


@pytest.fixture(scope="module")
def models(tiny):
    """A tiny teacher and a student distilled from it (class-aware)."""
    return tiny.teacher, tiny.student


def split(model_pair, images, labels, norm):
    teacher, student = model_pair
    t = predict(teacher, images, norm, CPU)[1]
    s = predict(student, images, norm, CPU)[1]
    return Split(images, labels, t, s)


def quant_nodes(graph: torch.fx.GraphModule) -> tuple[list, list]:
    """(per-channel weight quantize nodes, per-tensor activation quantize nodes)."""
    per_channel, per_tensor = [], []
    for node in graph.graph.nodes:
        name = str(node.target)
        if QUANT_OPS in name and "quantize_per_channel" in name and "dequant" not in name:
            per_channel.append(node)
        elif QUANT_OPS in name and "quantize_per_tensor" in name and "dequant" not in name:
            per_tensor.append(node)
    return per_channel, per_tensor


@pytest.mark.parametrize("target", ["jetson", "cpu", "mobile"])
def test_recipe_specs_per_target(data, models, target):
    x, _, _, _, norm = data
    model = ptq(models[1], target, x[:128], norm)
    graph = convert(model)
    per_channel, per_tensor = quant_nodes(graph)
    assert len(per_channel) == 5  # 3 convs + 2 linears, each weight per output channel
    for node in per_channel:
        _, scale, zero_point, axis, qmin, qmax, dtype = node.args
        zp = operator.attrgetter(zero_point.target)(graph)
        assert axis == 0
        largest = 63 if target == "cpu" else 127  # cpu: 7-bit weights (recipes.py)
        assert (qmin, qmax, dtype) == (-largest, largest, torch.int8)
        assert torch.all(zp == 0)
        weight = operator.attrgetter(node.args[0].target)(graph)
        assert operator.attrgetter(scale.target)(graph).numel() == weight.shape[0]
    zero_points = [node.args[2] for node in per_tensor]
    assert len(zero_points) >= 6
    dtype = torch.uint8 if target == "cpu" else torch.int8  # onnxruntime x86: u8 activations
    assert all(n.args[5] == dtype for n in per_tensor)
    if target == "jetson":  # TensorRT: symmetric activations, zero-point 0 everywhere
        assert set(zero_points) == {0}
    else:  # affine: post-ReLU tensors use the whole 8-bit range, from the type's minimum
        assert torch.iinfo(dtype).min in zero_points


@pytest.mark.parametrize(("bits", "largest"), [(8, 127), (7, 63)])
def test_weight_bits_set_the_weights_range_and_scale(data, models, bits, largest):
    x, _, _, _, norm = data
    graph = convert(ptq(models[1], "cpu", x[:128], norm, weight_bits=bits))
    per_channel, _ = quant_nodes(graph)
    for node in per_channel:
        weight, scale = (operator.attrgetter(a.target)(graph) for a in node.args[:2])
        assert node.args[4:6] == (-largest, largest)
        # symmetric per channel: the channel's largest |weight| maps to the range's end
        reach = weight.detach().abs().amax(dim=tuple(range(1, weight.dim())))
        torch.testing.assert_close(scale.float(), reach / largest, rtol=1e-5, atol=1e-7)


def test_weight_bits_other_than_7_or_8_are_refused(data, models):
    x, _, _, _, norm = data
    with pytest.raises(QuantError, match="weights of 6 bits: choose one of"):
        ptq(models[1], "cpu", x[:8], norm, weight_bits=6)


def test_a_layer_without_an_int8_kernel_stays_float_and_is_named_in_the_plan(tmp_path):
    """GELU has no int8 kernel anywhere: the student still quantizes and exports, GELU runs in
    float between a DequantizeLinear and the next conv's QuantizeLinear, and the plan says so."""
    import onnx

    from edgepc.targets import TARGETS

    class WithGelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.act = nn.GELU()
            self.conv2 = nn.Conv2d(4, 4, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.pool(self.conv2(self.act(self.conv(x)))).flatten(1))

    model = EmbeddingModel(WithGelu(), "pool")
    x = torch.randn(8, 1, 28, 28)
    for target in ("cpu", "mobile", "jetson"):
        quant = prepare(model, target, x, qat=False)
        plan = {layer.layer: layer for layer in quant.plan.layers}
        assert plan["act"].int8 is False
        assert plan["act"].reason == TARGETS[target].recipe.float_reason
        assert [plan[name].int8 for name in ("conv", "conv2", "fc")] == [True] * 3
        assert "1 gelu" in quant.plan.summary().split("float: ")[1]
    quant.calibrate([x])
    path = TARGETS["cpu"].write(convert(prepare(model, "cpu", x, qat=False)), x[:2], tmp_path,
                                True)  # fmt: skip
    ops = [n.op_type for n in onnx.load(path).graph.node]
    gelu = ops.index("Gelu") if "Gelu" in ops else ops.index("Erf")
    assert ops[gelu - 1] == "DequantizeLinear" or "DequantizeLinear" in ops[:gelu]
    assert "QuantizeLinear" in ops[gelu:]  # re-quantized for conv2


def test_qat_fine_tuning_reduces_coherence_loss(data, models):
    """β-only fine-tuning of the fake-quant student lowers L_PC against the teacher."""
    x, y, _, _, norm = data
    fit = split(models, x[:512], y[:512], norm)
    teacher_logits = predict(models[0], x[:512], norm, CPU)[0]

    def pc_loss(model):
        embeddings = predict(model, fit.images, norm, CPU)[1]
        return perception_coherence_loss(embeddings, fit.teacher).item()

    torch.manual_seed(0)
    start = prepare(models[1], "jetson", norm.apply(x[:8]))
    start.calibrate([norm.apply(x[:256])])
    config = TrainConfig(epochs=3, batch_size=64, lr=1e-3, alpha=0.0, beta=1.0)
    tuned, history = qat(
        models[1], "jetson", fit, teacher_logits, x[:256], norm, config, 1, CPU, progress=False
    )
    assert pc_loss(tuned) < 0.9 * pc_loss(start)
    assert history[-1]["loss_pc"] < history[0]["loss_pc"]
    # observers were frozen for the last epoch and stay frozen
    scales = {k: v.clone() for k, v in tuned.state_dict().items() if k.endswith(".scale")}
    tuned.train()
    tuned(norm.apply(x[:64]) * 3)
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in scales.items())


def test_gamma_needs_fp32_reference(data, models):
    x, y, _, _, norm = data
    with pytest.raises(TrainingError, match="gamma > 0"):
        train(build_model("tiny_cnn"), x[:64], y[:64], norm, TrainConfig(gamma=1.0), CPU)


def test_restore_and_int8_graph_match_the_fake_quant_model(data, models):
    x, y, tx, ty, norm = data
    fit = split(models, x[:256], y[:256], norm)
    teacher_logits = predict(models[0], x[:256], norm, CPU)[0]
    config = TrainConfig(epochs=1, batch_size=64, lr=1e-4, beta=1.0, gamma=1.0)
    model, _ = qat(
        models[1], "cpu", fit, teacher_logits, x[:256], norm, config, 1, CPU, progress=False
    )
    example = norm.apply(tx[:8])
    again = restore(models[1], "cpu", example, model.state_dict())
    a, b = predict(model, tx, norm, CPU), predict(again, tx, norm, CPU)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    int8 = quantized(model)  # batch norm folded, real quantize/dequantize ops
    c = predict(int8, tx, norm, CPU)
    assert (c[0] - a[0]).abs().max() < 0.05 * a[0].abs().max()
    assert (c[0].argmax(1) == a[0].argmax(1)).double().mean() > 0.95
    assert abs(top1(c[0], ty) - top1(a[0], ty)) <= 0.02  # a few one-step rounding flips
    with pytest.raises(QuantError, match="does not fit this student"):
        restore(build_model("mobilenetv2_0.5"), "cpu", example, model.state_dict())
    scores = score(int8, split(models, tx, ty, norm), norm, CPU, pc_limit=300)
    assert scores["pc_triplet_agreement_fp32"] > 0.9
    assert scores["top1"] == top1(c[0], ty)


@pytest.mark.slow
@pytest.mark.parametrize("qat_mode", [False, True], ids=["ptq", "qat"])
def test_int8_models_convert_to_real_int8_artifacts(tmp_path, data, models, qat_mode):
    """Both PTQ and QAT models become a QDQ ONNX run by onnxruntime (symmetric for jetson) and a
    full-integer .tflite run by the LiteRT interpreter, agreeing with the torch int8 graph."""
    import onnx
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    x, y, tx, _, norm = data
    fit = split(models, x[:256], y[:256], norm)
    teacher_logits = predict(models[0], x[:256], norm, CPU)[0]
    config = TrainConfig(epochs=1, batch_size=64, lr=1e-4, beta=1.0, gamma=1.0)

    def make(target):
        if not qat_mode:
            return ptq(models[1], target, x[:256], norm)
        args = (fit, teacher_logits, x[:256], norm, config, 1, CPU)
        return qat(models[1], target, *args, progress=False)[0]

    inputs = norm.apply(tx[:64])
    for target in ("jetson", "mobile"):
        graph = convert(make(target))
        logits, embedding = (t.detach().numpy() for t in graph(inputs))
        if target == "jetson":
            path = write_onnx(graph, inputs[:2], tmp_path / "model.onnx")
            proto = onnx.load(path)
            ops = {n.op_type for n in proto.graph.node}
            assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
            counts = check_onnx(path)  # TensorRT's rules: Q/DQ pairs, zero-point 0, axis 0
            assert counts["per_channel"] == 2 * 5  # Q and DQ of 3 conv + 2 linear weights
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            ort_logits, ort_embedding = session.run(None, {"images": inputs.numpy()})
            assert (ort_logits.argmax(1) == logits.argmax(1)).mean() >= 0.95
            assert np.abs(ort_embedding - embedding).max() < 0.05 * np.abs(embedding).max()
        else:
            path = write_tflite(graph, inputs, tmp_path / "model.tflite", int8=True)
            interpreter = Interpreter(str(path))
            interpreter.allocate_tensors()
            (inp,) = interpreter.get_input_details()
            assert inp["dtype"] == np.int8  # full integer: int8 in, int8 out
            scale, zero_point = inp["quantization"]
            outs = interpreter.get_output_details()
            assert all(o["dtype"] == np.int8 for o in outs)
            predicted = []
            for image in inputs[:32].numpy():
                q = np.clip(np.round(image / scale) + zero_point, -128, 127).astype(np.int8)
                interpreter.set_tensor(inp["index"], q[None])
                interpreter.invoke()
                out = min(outs, key=lambda o: o["shape"][-1])  # logits: 10 < embedding: 32
                predicted.append(interpreter.get_tensor(out["index"])[0].argmax())
            assert (np.array(predicted) == logits[:32].argmax(1)).mean() >= 0.9


def test_memoised_patterns_give_the_graph_torchao_traces(data, models, monkeypatch):
    """prepare/convert keep torchao's traced conv-bn patterns for the process: the int8 graph
    built from kept patterns is the one built by tracing them afresh."""
    from edgepc.quant import model as quant_model

    x, _, tx, _, norm = data
    example = norm.apply(x[:8])
    monkeypatch.setattr(quant_model, "_PATTERNS", {})
    fresh = convert(prepare(models[1], "cpu", example))
    assert len(quant_model._PATTERNS) >= 10  # the patterns of the conv-bn rewrites were kept
    kept = dict(quant_model._PATTERNS)
    again = convert(prepare(models[1], "cpu", example))
    assert quant_model._PATTERNS.keys() == kept.keys()  # nothing traced the second time
    assert fresh.code == again.code
    a, b = fresh(norm.apply(tx[:64])), again(norm.apply(tx[:64]))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_train_and_eval_of_a_quant_model_trace_their_patterns_once(data, models, monkeypatch):
    """QuantModel.train()/eval() rewrite the exported graph's dropout and batch-norm patterns:
    traced on the first switch, kept after, and the switched graph computes the same."""
    from torchao.quantization.pt2e import qat_utils, utils

    from edgepc.quant import model as quant_model

    x, _, tx, _, norm = data
    real, traced = utils._get_aten_graph_module_for_pattern, []

    def counting(*args, **kwargs):
        traced.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(utils, "_get_aten_graph_module_for_pattern", counting)
    monkeypatch.setattr(qat_utils, "_get_aten_graph_module_for_pattern", counting)
    model = prepare(models[1], "cpu", norm.apply(x[:8]))  # QAT: in train mode
    images = norm.apply(tx[:64])
    first = model.eval()(images)
    kept = set(quant_model._PATTERNS)
    assert len(kept) >= 6  # 4 dropout and 2 batch-norm patterns at least, traced or kept
    seen = len(traced)
    model.train()
    again = model.eval()(images)
    assert len(traced) == seen  # the second switch traced nothing
    assert set(quant_model._PATTERNS) == kept
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))


def test_patterns_of_convs_the_recipes_refuse_are_not_traced(data, models):
    """torchao's conv1d / transposed-conv patterns get a pattern that matches nothing: no
    recipe quantizes those layers, and the pattern indeed matches nothing in a real graph."""
    from torch.fx.subgraph_rewriter import replace_pattern_with_filters
    from torchao.quantization.pt2e import utils

    from edgepc.quant import model as quant_model

    assert set(quant_model._ABSENT_CONVS) == {F.conv1d, F.conv_transpose1d, F.conv_transpose2d}
    x, _, _, _, norm = data
    real = utils._get_aten_graph_module_for_pattern
    graph = prepare(models[1], "cpu", norm.apply(x[:8])).graph
    assert utils._get_aten_graph_module_for_pattern is real  # swapped only inside prepare
    before = graph.code
    nothing = quant_model._matches_nothing()
    assert replace_pattern_with_filters(graph, nothing, nothing, ignore_literals=True) == []
    assert graph.code == before


@pytest.mark.parametrize("target", ["cpu", "mobile", "jetson"])
def test_int8_graph_adds_the_bias_its_runtime_adds(setup, target):
    """onnxruntime and LiteRT add each conv / linear bias as int32 in units of input scale ×
    weight scale: the int8 graphs of those targets hold the biases on that grid."""
    _, int8, *_ = setup
    graph, decomposed = int8[target], torch.ops.quantized_decomposed
    checked = 0
    for node in graph.graph.nodes:
        if node.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            continue
        x, w, b = node.args[:3]
        assert x.target == decomposed.dequantize_per_tensor.default
        assert w.target == decomposed.dequantize_per_channel.default
        step = float(x.args[1]) * operator.attrgetter(w.args[1].target)(graph).double()
        units = operator.attrgetter(b.target)(graph).double() / step
        off_grid = (units - units.round()).abs().max().item()
        if target == "jetson":  # TensorRT: the float bias as trained
            assert off_grid > 0.1
        else:
            assert off_grid < 0.01  # float32 storage of up to ~10⁴ units
        checked += 1
    assert checked == 5  # 3 convs and 2 linears
