"""Static check that an ONNX file is explicitly quantized the way TensorRT builds it.

TensorRT (8.x+, explicit quantization) takes int8 only as QuantizeLinear/DequantizeLinear pairs
with zero-point 0, weights quantized per output channel (axis 0), opset 13 or newer, and ops its
ONNX parser knows. ``check_onnx`` verifies these rules without TensorRT and names the first
offending node, so a bad graph is caught on the training machine, not on the Jetson.
"""

from __future__ import annotations

from pathlib import Path

from edgepc.export.writers import ExportError

MIN_OPSET = 13
QDQ = ("QuantizeLinear", "DequantizeLinear")
# Integer ops of onnxruntime's QOperator format: TensorRT does not take them.
INTEGER_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
}
# The ONNX ops a CNN student lowers to that TensorRT's parser supports (onnx-tensorrt's
# operators list); anything else is reported rather than discovered on the device.
SUPPORTED = {
    *QDQ,
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv",
    "Div", "Flatten", "Gather", "Gemm", "GlobalAveragePool", "HardSigmoid", "HardSwish",
    "Identity", "MatMul", "MaxPool",
    "Mul", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split",
    "Squeeze", "Sub", "Transpose", "Unsqueeze",
}  # fmt: skip


WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}  # input 1: the weights


class TensorRTCheckError(ExportError):
    """The ONNX graph breaks a rule of TensorRT's explicit quantization."""


def check_onnx(path: Path) -> dict[str, int]:
    """Raise TensorRTCheckError naming the first node that TensorRT would reject; return counts
    (``quantize``, ``dequantize``, ``per_channel``, ``nodes``) of a graph that passes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise TensorRTCheckError(f"{path.name}: opset {opset} < {MIN_OPSET}: export with newer")
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    counts = {"quantize": 0, "dequantize": 0, "per_channel": 0, "nodes": len(graph.node)}

    def fail(node: onnx.NodeProto, why: str) -> None:
        raise TensorRTCheckError(f"{path.name}: node {node.name!r} ({node.op_type}): {why}")

    for node in graph.node:
        if node.op_type in INTEGER_OPS:
            fail(node, "integer (QOperator) op; TensorRT takes only Q/DQ pairs")
        if node.op_type not in SUPPORTED:
            fail(node, "op not in the TensorRT ONNX parser's supported set")
        if node.op_type not in QDQ:
            continue
        counts["quantize" if node.op_type == "QuantizeLinear" else "dequantize"] += 1
        if len(node.input) < 3 or node.input[2] not in constants:
            fail(node, "needs a constant int8 zero-point input")
        zero_point, scale = constants[node.input[2]], constants.get(node.input[1])
        if zero_point.dtype.name != "int8":
            fail(node, f"zero-point is {zero_point.dtype.name}; TensorRT takes int8 only")
        if zero_point.any():
            fail(node, "zero-point is not 0 (TensorRT quantization is symmetric)")
        if scale is not None and scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if axis != 0:
                fail(node, f"per-channel quantization on axis {axis}; TensorRT wants axis 0")
            counts["per_channel"] += 1
        if node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users):
                fail(node, "QuantizeLinear must feed only DequantizeLinear (a Q/DQ pair)")
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:  # weights: per output channel
        weight = producers.get(node.input[1]) if node.op_type in WEIGHTED else None
        if weight is not None and weight.op_type == "DequantizeLinear":
            scale = constants.get(weight.input[1])
            if scale is not None and scale.ndim == 0:
                fail(weight, f"weights of {node.name!r} quantized per tensor; TensorRT wants "
                     "per-channel weight scales (axis 0)")  # fmt: skip
    if not counts["quantize"]:
        raise TensorRTCheckError(f"{path.name}: no QuantizeLinear: the graph is not int8")
    return counts
