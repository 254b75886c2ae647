"""ONNX and TFLite files from a model whose ``forward(x) -> (logits, embedding)``: an fp32
student or the int8 graph of :func:`edgepc.quant.convert`. Files appear complete or not at all."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from edgepc.errors import EdgepcError
from edgepc.files import atomic_path
from edgepc_device.bundle import INPUT, OUTPUTS
from edgepc_device.runtimes import quiet_native_logs

if TYPE_CHECKING:
    import onnx


class ExportError(EdgepcError):
    """A model cannot be written for a runtime, or the runtime's package is missing."""


def missing(package: str, extra: str) -> ExportError:
    return ExportError(f"{package} is not installed: pip install -e '.[{extra}]'")


def _input_uses(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs read each value."""
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return uses


def _along_axis(
    node: onnx.NodeProto, weight: np.ndarray, scale: np.ndarray, zero: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A Q/DQ node's scale and zero-point (as float32) shaped to broadcast against ``weight``:
    per channel along the node's ``axis`` (default 1), or per tensor."""
    shape = [1] * weight.ndim
    if scale.size > 1:
        shape[next((a.i for a in node.attribute if a.name == "axis"), 1)] = -1
    return scale.reshape(shape), zero.reshape(shape).astype(np.float32)


def drop_weight_clips(model: onnx.ModelProto) -> int:
    """Remove the Clip that torch's exporter puts between a weight's QuantizeLinear and
    DequantizeLinear (the ±127 weight range): TensorRT needs the pair adjacent, onnxruntime
    fuses only adjacent pairs. The float weight is clamped to ±127·scale (+ zero-point) first,
    which gives the same int8 values since the bounds are integers. Returns how many went."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    constants = {name: numpy_helper.to_array(i) for name, i in inits.items()}
    producers = {out: node for node in model.graph.node for out in node.output}
    uses = _input_uses(model)
    removed = []
    for node in model.graph.node:
        quantize = producers.get(node.input[0]) if node.op_type == "Clip" else None
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        weight, scale, zero = (constants.get(name) for name in quantize.input[:3])
        low, high = (constants.get(name) for name in node.input[1:3])
        if any(v is None for v in (weight, scale, zero, low, high)) or uses[quantize.input[0]] > 1:
            continue
        scale, zero = _along_axis(quantize, weight, scale, zero)
        clamped = np.clip(weight, (low - zero) * scale, (high - zero) * scale)
        inits[quantize.input[0]].CopyFrom(numpy_helper.from_array(clamped, quantize.input[0]))
        for user in model.graph.node:
            user.input[:] = [node.input[0] if i == node.output[0] else i for i in user.input]
        removed.append(node)
    for node in removed:
        model.graph.node.remove(node)
    return len(removed)


def store_int8_weights(model: onnx.ModelProto) -> int:
    """Replace each QuantizeLinear of a constant float weight by the int8 tensor it computes,
    so the file holds int8 weights feeding DequantizeLinear (a quarter of the bytes; what
    onnxruntime's own quantizer writes). Rounding is half to even, as QuantizeLinear's.
    Returns how many weights were stored as int8."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    uses = _input_uses(model)
    folded = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or not all(i in inits for i in node.input[:3]):
            continue
        weight, scale, zero = (numpy_helper.to_array(inits[i]) for i in node.input[:3])
        if zero.dtype != np.int8:
            continue
        scale, zero = _along_axis(node, weight, scale, zero)
        q = np.round(weight / scale) + zero
        stored = np.clip(q, -128, 127).astype(np.int8)
        model.graph.initializer.append(numpy_helper.from_array(stored, node.output[0]))
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
        if uses[node.input[0]] == 1:
            model.graph.initializer.remove(inits[node.input[0]])
    return len(folded)


def global_pools(model: onnx.ModelProto) -> int:
    """Write each ReduceMean over the two spatial axes of a 4-D tensor (dims kept) as the
    GlobalAveragePool it is: onnxruntime runs that between a DequantizeLinear and a
    QuantizeLinear as QLinearGlobalAveragePool (uint8), a ReduceMean in float. Needs the
    exporter's shapes (``value_info``). Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.value_info}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "ReduceMean" or len(node.input) < 2 or ranks.get(node.input[0]) != 4:
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        axes = constants.get(node.input[1])
        if keepdims != 1 or axes is None or sorted(int(a) % 4 for a in axes.ravel()) != [2, 3]:
            continue
        node.CopyFrom(helper.make_node("GlobalAveragePool", node.input[:1], node.output, node.name))
        rewritten += 1
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return rewritten


def unshare_zero_points(model: onnx.ModelProto) -> int:
    """Give each DequantizeLinear its own zero-point initializer. The exporter lets weights of
    one width share a zero-point tensor, and onnxruntime's exact int8 mode (``session.
    x64quantprecision``, :func:`edgepc_device.runtimes.x86_without_vnni`) rewrites each weight's
    zero point to uint8 under one name per weight: on a shared one session creation fails with
    "Attempt to replace the existing tensor". Returns how many copies were made."""
    inits = {i.name: i for i in model.graph.initializer}
    seen: set[str] = set()
    copies = 0
    for node in model.graph.node:
        name = node.input[2] if node.op_type == "DequantizeLinear" and len(node.input) > 2 else ""
        if name not in inits:
            continue
        if name in seen:
            copies += 1
            while f"{name}.{copies}" in inits:
                copies += 1
            copy = model.graph.initializer.add()
            copy.CopyFrom(inits[name])
            copy.name = node.input[2] = f"{name}.{copies}"
        seen.add(name)
    return copies


def write_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    int8_weights: bool = False,
    opset: int = 18,
    dynamic: bool = True,
) -> Path:
    """ONNX with a dynamic batch (torch's dynamo exporter; ``dynamic=False``: the example's,
    a faster export); int8 graphs become QDQ ONNX with adjacent QuantizeLinear/DequantizeLinear
    pairs, and with ``int8_weights`` the weights are stored as int8 behind DequantizeLinear alone
    (see :func:`store_int8_weights`)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError:
        raise missing("onnxscript", "cpu") from None
    batch = Dim("batch", min=1, max=4096)
    with (
        atomic_path(path) as tmp,
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=True,
            dynamic_shapes=({0: batch},) if dynamic else None,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
        proto = onnx.load(str(tmp))
        drop_weight_clips(proto)
        global_pools(proto)
        if int8_weights:
            store_int8_weights(proto)
        unshare_zero_points(proto)
        for node in proto.graph.node:  # the exporter's stack traces: a third of a small file
            del node.metadata_props[:]
            node.doc_string = ""
        del proto.graph.value_info[:]  # cached shapes of inner tensors: runtimes infer them
        del proto.graph.metadata_props[:]  # the exporter's graph signature, as text (16-43 kB)
        onnx.save(proto, str(tmp))
    return path


def write_tflite(model: nn.Module, example: torch.Tensor, path: Path, int8: bool) -> Path:
    """A .tflite at batch 1 via litert-torch; ``int8``: full-integer (int8 input and outputs)
    from an int8 graph of :func:`edgepc.quant.convert`."""
    try:
        with quiet_native_logs():  # TensorFlow's start-up lines
            import litert_torch
            from litert_torch.quantize import pt2e_quantizer
            from litert_torch.quantize.quant_config import QuantConfig
    except ImportError:
        raise missing("litert-torch", "mobile") from None
    quant_config = None
    if int8:  # the converter reads only the mode (static int8) from this quantizer
        static = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
        quant_config = QuantConfig(pt2e_quantizer.PT2EQuantizer().set_global(static))
    if isinstance(model, torch.fx.GraphModule):
        model.training = False  # its ops are in eval form already (edgepc.quant.convert)
    else:
        model = model.eval()
    with atomic_path(path) as tmp, warnings.catch_warnings(), quiet_native_logs():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):  # its progress log
            converted = litert_torch.convert(model, (example[:1],), quant_config=quant_config)
            converted.export(str(tmp))
    return path
