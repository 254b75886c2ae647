"""What int8 means on each target, as a PT2E quantizer (torchao's public quantizer API), and
which layers it takes.

Every target quantizes the same places, the places its runtime fuses into int8 kernels:

- each conv / linear takes a quantized input and int8 weights, symmetric per output channel
  (axis 0, zero-point 0); its output is quantized after its batch norm and its ReLU / ReLU6,
  so the clamp becomes the quantized range and costs nothing at run time;
- each residual add takes quantized inputs and quantizes its output (after its ReLU);
- layout and pooling ops inside the network (max-pool, flatten, view, transpose, chunk) keep
  their input's scale, so runtimes run them on int8 data; a concatenation quantizes its output.

The targets differ in the types their runtime's int8 kernels take:

- ``cpu`` (onnxruntime QDQ): uint8 activations, affine (zero-point 0 after a ReLU), and 7-bit
  weights (±63), the u8·s8 form of onnxruntime's x86 kernels. On x86 CPUs without VNNI those
  kernels add each pair of products in a saturating int16 (``vpmaddubsw``): 255 × 63 × 2 <
  32,767 keeps them exact, where ±127 weights drift. onnxruntime's exact mode (its slower
  uint8 × uint8 kernels, :func:`edgepc_device.runtimes.x86_without_vnni`) widens only weights
  outside ±64, so one file runs exactly and on the fast kernels on every x86 CPU, VNNI or not.
  The ONNX writer stores biases as int32;
- ``mobile`` (LiteRT full-integer, the TFLite int8 spec): int8 activations, affine, ±127
  weights;
- ``jetson`` (TensorRT explicit quantization): int8, symmetric (zero-point 0 everywhere), ±127
  weights.

``weight_bits`` (7 or 8) overrides a recipe's weights, e.g. 8 for a fleet of VNNI CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgepc.errors import QuantError

if TYPE_CHECKING:
    from torch.fx import GraphModule, Node
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        QuantizationSpec,
        Quantizer,
    )


@dataclass(frozen=True)
class Recipe:
    activation_dtype: torch.dtype
    symmetric_activations: bool
    weight_bits: int
    int32_bias: bool  # the runtime adds biases as int32 in units of input × weight scale
    description: str


ONNXRUNTIME_QDQ = Recipe(torch.uint8, False, 7, True,
                         "onnxruntime QDQ, u8 activations, 7-bit weights")  # fmt: skip
LITERT_INT8 = Recipe(torch.int8, False, 8, True, "LiteRT full-integer int8")
TENSORRT_QDQ = Recipe(torch.int8, True, 8, False,
                      "TensorRT explicit quantization (Q/DQ, zero-point 0)")  # fmt: skip

# Layers every target's int8 kernels cover (conv / linear with folded batch norm, ReLU-family
# activations, pooling); anything else is refused up front rather than left in float.
SUPPORTED = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)


def recipe(target: str) -> Recipe:
    """The int8 recipe of a target of :data:`edgepc.targets.TARGETS`."""
    from edgepc.targets import TARGETS  # the table holds each target's recipe

    if target not in TARGETS:
        known = ", ".join(TARGETS)
        raise QuantError(f"no int8 recipe for target {target!r}: choose one of {known}")
    return TARGETS[target].recipe


def check_supported(model: nn.Module, target: str) -> None:
    """Raise QuantError naming the first layer that the target's int8 recipe cannot take."""
    recipe(target)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # may be empty, e.g. a stride-1
    for name, module in model.named_modules():  # ShuffleNet block's branch1
        leaf = next(module.children(), None) is None and not isinstance(module, containers)
        if leaf and not isinstance(module, SUPPORTED):
            supported = ", ".join(t.__name__ for t in SUPPORTED)
            raise QuantError(
                f"layer {name!r} ({type(module).__name__}) has no int8 kernel in the {target} "
                f"recipe; supported layers: {supported}. Replace it or pick another student"
            )


aten = torch.ops.aten
WEIGHTED = {aten.conv2d.default, aten.linear.default}
NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
CLAMPS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}
ADDS = {aten.add.Tensor, aten.add_.Tensor}
SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}
AVERAGES = {aten.mean.dim, aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default}
# Ops that move or select int8 values without arithmetic: they keep their input's scale.
KEEP_SCALE = {
    aten.max_pool2d.default,
    aten.flatten.using_ints,
    aten.view.default,
    aten.reshape.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.dropout.default,
}


WEIGHT_BITS = (7, 8)


def weight_bits(target: str, bits: int | None = None) -> int:
    """``bits``, or the bits of ``target``'s recipe when None; anything but 7 or 8 is refused."""
    bits = recipe(target).weight_bits if bits is None else bits
    if bits not in WEIGHT_BITS:
        raise QuantError(f"weights of {bits} bits: choose one of {WEIGHT_BITS}")
    return bits


def _specs(recipe: Recipe, qat: bool, bits: int) -> tuple[QuantizationSpec, QuantizationSpec]:
    """(activation, weight) specs: per-tensor activations of the recipe's type, symmetric
    ``bits``-bit weights per output channel (stored as int8). PTQ observes (histogram for
    activations), QAT fake-quantizes with moving averages of the ranges."""
    from torchao.quantization.pt2e import (
        FusedMovingAvgObsFakeQuantize,
        HistogramObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    info = torch.iinfo(recipe.activation_dtype)
    if qat:
        act_ctr = FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, eps=2**-12
        )
        weight_ctr = FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, eps=2**-12
        )
    else:
        act_ctr = HistogramObserver.with_args(eps=2**-12)
        weight_ctr = PerChannelMinMaxObserver.with_args(eps=2**-12)
    symmetric = recipe.symmetric_activations
    activation = QuantizationSpec(
        dtype=recipe.activation_dtype,
        quant_min=info.min,
        quant_max=info.max,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=act_ctr,
    )
    largest = 2 ** (bits - 1) - 1  # 127 or 63
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-largest,
        quant_max=largest,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=weight_ctr,
    )
    return activation, weight


def _sole_user(node: Node, targets: set) -> Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in targets:
        return users[0]
    return None


def annotate(graph: torch.fx.Graph, activation: QuantizationSpec, weight: QuantizationSpec) -> None:
    """Mark where ``graph`` (an exported student) is quantized, as PT2E annotations, in place."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    def mark(node: Node, inputs: dict | None = None, output: object = None) -> None:
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map=inputs or {}, output_qspec=output, _annotated=True
        )

    def annotation(node: Node) -> QuantizationAnnotation | None:
        return node.meta.get("quantization_annotation")

    def group(node: Node, inputs: dict, follow: tuple[set, ...]) -> None:
        """``node`` with the ops fused into it (its batch norm, then its ReLU / ReLU6):
        quantized inputs, one quantized output after the last of them."""
        mark(node, inputs)
        for kinds in follow:
            nxt = _sole_user(node, kinds)
            if nxt is not None and annotation(nxt) is None:
                mark(nxt)
                node = nxt
        annotation(node).output_qspec = activation

    def quantized(node: Node) -> bool:
        return annotation(node) is not None and annotation(node).output_qspec is not None

    for node in graph.nodes:
        if node.op != "call_function" or annotation(node) is not None:
            continue
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if node.target in WEIGHTED:
            group(node, {args[0]: activation, args[1]: weight}, (NORMS, CLAMPS))
        elif node.target in ADDS and len(args) == 2:  # not a batch norm's counter += 1
            group(node, {a: activation for a in args}, (CLAMPS,))
        elif node.target is aten.cat.default:
            mark(node, {a: activation for a in node.args[0]}, activation)
        elif node.target in KEEP_SCALE and quantized(args[0]):
            mark(node, {args[0]: activation}, SharedQuantizationSpec((args[0], node)))
        elif node.target in SPLITS and quantized(args[0]):  # int8 in, int8 parts out
            mark(node, {args[0]: activation})
            for part in node.users:
                mark(part, {}, SharedQuantizationSpec((args[0], node)))
        elif node.target in AVERAGES and quantized(args[0]):
            mark(node, {args[0]: activation}, activation)


def quantizer(target: str, qat: bool, bits: int | None = None) -> Quantizer:
    """The PT2E quantizer of ``target`` (fake-quant modules for QAT, observers for PTQ) with
    ``bits``-bit weights (None: the recipe's)."""
    from torchao.quantization.pt2e.quantizer import Quantizer

    activation, weight = _specs(recipe(target), qat, weight_bits(target, bits))

    class EdgeQuantizer(Quantizer):
        def annotate(self, model: GraphModule) -> GraphModule:
            annotate(model.graph, activation, weight)
            return model

        def validate(self, model: GraphModule) -> None:
            pass

    return EdgeQuantizer()
