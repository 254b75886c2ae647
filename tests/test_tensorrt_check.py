"""The static TensorRT checker on small hand-built ONNX graphs, one broken rule each."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepc.export.tensorrt import TensorRTCheckError, check_onnx


def qdq_conv(
    tmp_path,
    zero_point: int = 0,
    axis: int = 0,
    opset: int = 17,
    after_q: str = "DequantizeLinear",
    extra: str | None = None,
    zp_dtype=np.int8,
    weight_clip: bool = False,
    per_tensor_weights: bool = False,
):
    """x -> Q -> DQ -> Conv(W: Q [-> Clip(±127)] -> DQ per channel) -> Relu [-> extra op] -> y;
    with ``weight_clip`` the weights overflow ±127 · scale, as QAT's can."""
    w = np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)
    w = w * 2 if weight_clip else w
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(0.1, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zero_point, zp_dtype), "x_zp"),
        numpy_helper.from_array(
            np.full(() if per_tensor_weights else 4, 0.01, np.float32), "w_scale"
        ),
        numpy_helper.from_array(np.zeros(() if per_tensor_weights else 4, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(-127, np.int8), "lo"),
        numpy_helper.from_array(np.array(127, np.int8), "hi"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q_x"),
        helper.make_node(after_q, ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x"),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], name="q_w", axis=axis),
        *(
            [helper.make_node("Clip", ["wq", "lo", "hi"], ["wc"], name="clip")]
            if weight_clip
            else []
        ),
        helper.make_node(
            "DequantizeLinear",
            ["wc" if weight_clip else "wq", "w_scale", "w_zp"],
            ["wd"],
            name="dq_w",
            axis=axis,
        ),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r" if extra else "y"], name="relu"),
    ]
    if extra:
        nodes.append(helper.make_node(extra, ["r"], ["y"], name="odd"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def test_a_clean_qdq_graph_passes(tmp_path):
    counts = check_onnx(qdq_conv(tmp_path))
    assert counts == {"quantize": 2, "dequantize": 2, "per_channel": 2, "nodes": 6}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zero_point": 3}, r"node 'q_x' \(QuantizeLinear\): zero-point is not 0"),
        ({"axis": 1}, r"node 'q_w' .*per-channel quantization on axis 1"),
        ({"opset": 12}, "opset 12 < 13"),
        ({"after_q": "Relu"}, r"node 'q_x' .*must feed only DequantizeLinear"),
        ({"extra": "Erf"}, r"node 'odd' \(Erf\): op not in the TensorRT"),
        ({"extra": "ConvInteger"}, r"node 'odd' \(ConvInteger\): integer \(QOperator\) op"),
        ({"zp_dtype": np.uint8}, r"node 'q_x' .*zero-point is uint8"),
        ({"per_tensor_weights": True}, r"node 'dq_w' .*weights of 'conv' quantized per tensor"),
    ],
)
def test_each_broken_rule_names_the_node(tmp_path, kwargs, message):
    with pytest.raises(TensorRTCheckError, match=message):
        check_onnx(qdq_conv(tmp_path, **kwargs))


def test_dropping_the_weight_clip_keeps_the_outputs(tmp_path):
    """Q -> Clip(±127) -> DQ on a weight whose range overflows: clamping the float weight and
    removing the Clip gives the same results in onnxruntime, and the graph passes the checker."""
    import onnxruntime as ort

    from edgepc.export.writers import drop_weight_clips

    model = onnx.load(qdq_conv(tmp_path, weight_clip=True))
    x = {"x": np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    assert drop_weight_clips(model) == 1
    assert "Clip" not in {n.op_type for n in model.graph.node}
    after = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    np.testing.assert_array_equal(before, after)
    onnx.save(model, tmp_path / "fixed.onnx")
    assert check_onnx(tmp_path / "fixed.onnx")["per_channel"] == 2
