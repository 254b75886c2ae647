"""What a runtime actually executes from a model file: the properties that decide int8 speed,
read from the runtime itself rather than timed.

- :func:`onnxruntime_ops`: the op types of onnxruntime's own optimised graph (the graph it runs
  after its QDQ fusions and layout transforms), e.g. ``QLinearConv`` vs a float ``Conv``;
- :func:`integer_weight_types`: whether those int8 ops keep onnxruntime's fast kernels in its
  exact mode (int8 weights) or are widened to its slower exact ones (uint8 weights);
- :func:`litert_plan`: the ops of a .tflite, whether the XNNPACK delegate takes all of them (one
  delegate partition from the graph's inputs to its outputs), and ops that would transform a
  constant (a weight transposed or dequantized at run time).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgepc.export.writers import missing
from edgepc_device.runtimes import onnx_session_options, quiet_native_logs

if TYPE_CHECKING:
    import onnx

# float ops where int8 ones exist (Fused*: onnxruntime's float op with its activation)
FLOAT_COMPUTE = {"Conv", "Gemm", "MatMul", "ConvTranspose", "FusedConv", "FusedGemm", "FusedMatMul"}


def float_compute(ops: Counter[str]) -> Counter[str]:
    """The float conv / matrix ops of :func:`onnxruntime_ops` in any domain (``Conv``,
    ``com.microsoft.nchwc.Conv``, ...), not their integer ``QLinear*`` / ``QGemm`` forms."""
    return Counter({op: n for op, n in ops.items() if op.rsplit(".", 1)[-1] in FLOAT_COMPUTE})


def _optimised_graph(path: Path, exact: bool | None = None) -> onnx.GraphProto:
    """The graph onnxruntime's CPU provider runs for ``path`` (all optimisations on, session
    options of :func:`edgepc_device.runtimes.onnx_session_options`)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise missing("onnxruntime", "cpu") from None
    with tempfile.TemporaryDirectory() as tmp:
        options = onnx_session_options(threads=1, exact=exact)
        options.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath).graph


def onnxruntime_ops(path: Path) -> Counter[str]:
    """Op types of the graph onnxruntime's CPU provider runs for ``path`` (as the validate stage
    and the device script run it); contrib ops as ``com.microsoft.NAME``."""
    return Counter(
        f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in _optimised_graph(path).node
    )


# Integer conv / matrix ops and the input that holds their weight.
INTEGER_WEIGHT_INPUT = {"QLinearConv": 3, "QGemm": 3, "QLinearMatMul": 3, "MatMulInteger": 1}


def integer_weight_types(path: Path) -> Counter[str]:
    """Element types of the weights of onnxruntime's integer conv / matrix ops for ``path`` in
    its exact int8 mode (``session.x64quantprecision``, on any CPU): ``int8`` weights stay on
    the fast uint8 × int8 kernels, ``uint8`` ones were widened to the exact, slower uint8 ×
    uint8 kernels (onnxruntime widens every weight with a value outside ±64, on x86 only)."""
    from onnx import helper

    graph = _optimised_graph(path, exact=True)
    types = {i.name: helper.tensor_dtype_to_np_dtype(i.data_type).name for i in graph.initializer}
    return Counter(
        types.get(node.input[INTEGER_WEIGHT_INPUT[node.op_type]], "computed")
        for node in graph.node
        if node.op_type in INTEGER_WEIGHT_INPUT
    )


@dataclass(frozen=True)
class LiteRTPlan:
    ops: Counter[str]  # op types of the file
    delegated_whole_graph: bool  # XNNPACK runs every op, as one partition
    constant_transforms: list[str]  # TRANSPOSE / DEQUANTIZE etc. applied to a constant
    float_weights: list[str]  # conv / fully-connected ops whose filter is not int8
    float_ops: list[str]  # ops that read or write a float32 tensor computed at run time


def litert_plan(path: Path) -> LiteRTPlan:
    """Read ``path`` in the LiteRT interpreter with its default XNNPACK delegate applied."""
    try:
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise missing("ai-edge-litert", "mobile") from None
    with quiet_native_logs():
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
    details = interpreter._get_ops_details()  # the op list the interpreter holds (private API)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    constant = _constant_tensors(path)
    inputs = {t["index"] for t in interpreter.get_input_details()}
    outputs = {t["index"] for t in interpreter.get_output_details()}
    model_ops = [op for op in details if op["op_name"] != "DELEGATE"]
    delegates = [op for op in details if op["op_name"] == "DELEGATE"]
    whole = len(delegates) == 1 and (
        set(delegates[0]["outputs"]) == outputs and set(delegates[0]["inputs"]) <= inputs | constant
    )
    transforms = [
        f"{op['op_name']}#{op['index']}"
        for op in model_ops
        if op["op_name"] in ("TRANSPOSE", "DEQUANTIZE", "QUANTIZE", "RESHAPE", "CAST")
        and any(i in constant for i in op["inputs"][:1])
    ]
    weighted = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
    float_weights = [
        f"{op['op_name']}#{op['index']}"
        for op in model_ops
        if op["op_name"] in weighted and tensors[op["inputs"][1]]["dtype"] != np.int8
    ]
    computed_float = {i for i, t in tensors.items() if t["dtype"] == np.float32} - constant
    float_ops = [
        f"{op['op_name']}#{op['index']}"
        for op in model_ops
        if computed_float & {*op["inputs"], *op["outputs"]}
    ]
    ops = Counter(op["op_name"] for op in model_ops)
    return LiteRTPlan(ops, whole, transforms, float_weights, float_ops)


def _constant_tensors(path: Path) -> set[int]:
    """Tensors of the main subgraph with data in the file (weights, biases, shapes)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    buffers = model.buffers
    return {
        index
        for index, tensor in enumerate(model.subgraphs[0].tensors)
        if buffers[tensor.buffer].data is not None and len(buffers[tensor.buffer].data) > 0
    }


def tflite_bytes(path: Path) -> dict[str, int]:
    """Where the bytes of a .tflite go: constant data by type (``int8`` weights, ``int32``
    biases, ``float32`` ...), ``quantization`` parameters (per channel: a float32 scale and an
    int64 zero point, the format's fixed cost), tensor ``names``, and ``other`` (the flatbuffer's
    tables, op options, alignment); the parts sum to the file's size."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    parts: dict[str, int] = {}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            data = model.buffers[tensor.buffer].data
            if data is not None and len(data):
                kind = types.get(tensor.type, str(tensor.type))
                parts[kind] = parts.get(kind, 0) + len(data)
            q = tensor.quantization
            if q is not None:
                sizes = ((q.scale, 4), (q.zeroPoint, 8), (q.min, 4), (q.max, 4))
                quant = sum(np.size(a) * n for a, n in sizes if a is not None)
                parts["quantization"] = parts.get("quantization", 0) + int(quant)
            parts["names"] = parts.get("names", 0) + len(tensor.name or b"")
    parts["other"] = path.stat().st_size - sum(parts.values())
    return parts
