"""What int8 means on each target, as a PT2E quantizer (torchao's public quantizer API), and
which layers it takes: exactly those its runtime runs with int8 kernels. The rest stay float,
between a DequantizeLinear and the next QuantizeLinear, and the precision plan
(:mod:`edgepc.quant.plan`) names each of them and why.

Every target quantizes:

- each conv / linear: a quantized input and int8 weights, symmetric per output channel (axis
  0, zero-point 0); its output is quantized after its batch norm and its ReLU / ReLU6, so the
  clamp becomes the quantized range and costs nothing at run time;
- each residual add: quantized inputs, its output quantized (after its ReLU);
- layout ops inside the network (max-pool, flatten, view, transpose, chunk) keep their input's
  scale; a concatenation quantizes its output.

Beyond those, a recipe lists the op families its runtime has int8 kernels for
(:attr:`Recipe.int8_ops`), read from each runtime's own kernel coverage:

- ``cpu`` (onnxruntime QDQ): element-wise ``mul`` (QLinearMul, the squeeze-excitation gate),
  ``sigmoid`` (QLinearSigmoid) and ``global mean`` (the exporter's ReduceMean over both spatial
  axes is written as GlobalAveragePool: QLinearGlobalAveragePool); SiLU is split into sigmoid
  and mul to use both. No int8 HardSwish, HardSigmoid or other means: those run in float.
  Activations are uint8, affine (zero-point 0 after a ReLU), with 7-bit weights (±63), the
  u8·s8 form of onnxruntime's x86 kernels: on x86 CPUs without VNNI those kernels add each pair
  of products in a saturating int16 (``vpmaddubsw``), and 255 × 63 × 2 < 32,767 keeps them
  exact where ±127 weights drift. onnxruntime's exact mode
  (:func:`edgepc_device.runtimes.x86_without_vnni`) widens only weights outside ±64, so one
  file runs exactly and on the fast kernels on every x86 CPU;
- ``mobile`` (LiteRT full-integer, the TFLite int8 spec, XNNPACK): also ``mul``, ``sigmoid``
  (LOGISTIC, output scale 1/256 as the spec fixes it) and ``mean`` (MEAN). XNNPACK takes no
  int8 HARD_SWISH and TFLite has no HardSigmoid: both, and SiLU, are written as int8 ADD / MUL /
  LOGISTIC, so one XNNPACK delegate runs the whole graph. int8 activations, affine, ±127
  weights;
- ``jetson`` (TensorRT explicit quantization): Q/DQ where NVIDIA places them, at the inputs of
  convs, linears and residual adds; TensorRT fuses the point-wise ops in between (activations,
  gates) into those kernels in its own precision. int8, symmetric (zero-point 0 everywhere),
  ±127 weights.

``weight_bits`` (7 or 8) overrides a recipe's weights, e.g. 8 for a fleet of VNNI CPUs, and
``keep_float`` ({layer pattern: why}) keeps more layers float: those that run faster in float on
the device (:mod:`edgepc.export.speed_plan`) or that a user names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import torch

from edgepc.errors import QuantError

if TYPE_CHECKING:
    from torch.fx import GraphModule, Node
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        QuantizationSpec,
        Quantizer,
    )

    from edgepc.quant.plan import PrecisionPlan


@dataclass(frozen=True)
class Recipe:
    activation_dtype: torch.dtype
    symmetric_activations: bool
    weight_bits: int
    int32_bias: bool  # the runtime adds biases as int32 in units of input × weight scale
    runtime: str  # whose int8 kernels the recipe follows
    int8_ops: frozenset[str]  # op families (keys of FAMILIES) with int8 kernels in it
    split: frozenset[str]  # activations rewritten into int8 ops of it (split_activations)
    description: str
    left_float: str = ""  # why the other ops stay float (default: no int8 kernel in runtime)

    @property
    def float_reason(self) -> str:
        return self.left_float or f"no int8 kernel in {self.runtime}"


CORE = frozenset({"conv", "linear", "add", "cat"})  # every runtime's int8 kernels
ONNXRUNTIME_QDQ = Recipe(torch.uint8, False, 7, True, "onnxruntime",
                         CORE | {"mul", "sigmoid", "global mean"},
                         frozenset({"silu"}),
                         "onnxruntime QDQ, u8 activations, 7-bit weights")  # fmt: skip
LITERT_INT8 = Recipe(torch.int8, False, 8, True, "LiteRT", CORE | {"mul", "sigmoid", "mean"},
                     frozenset({"silu", "hardswish", "hardsigmoid"}),
                     "LiteRT full-integer int8")  # fmt: skip
TENSORRT_QDQ = Recipe(torch.int8, True, 8, False, "TensorRT", CORE | {"mean"}, frozenset(),
                      "TensorRT explicit quantization (Q/DQ, zero-point 0)",
                      "no Q/DQ: TensorRT fuses it with its int8 neighbours")  # fmt: skip


def recipe(target: str) -> Recipe:
    """The int8 recipe of a target of :data:`edgepc.targets.TARGETS`."""
    from edgepc.targets import TARGETS  # the table holds each target's recipe

    if target not in TARGETS:
        known = ", ".join(TARGETS)
        raise QuantError(f"no int8 recipe for target {target!r}: choose one of {known}")
    return TARGETS[target].recipe


aten = torch.ops.aten
WEIGHTED = {aten.conv2d.default, aten.linear.default}
NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
CLAMPS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}
ADDS = {aten.add.Tensor, aten.add_.Tensor}
MULS = {aten.mul.Tensor, aten.mul_.Tensor}
SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}
AVERAGES = {aten.mean.dim, aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default}
SILUS = {aten.silu.default, aten.silu_.default}
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
    aten.dropout_.default,
}
# The op families a recipe may run in int8, by the aten ops they are in an exported student.
FAMILIES: dict[str, set] = {
    "conv": {aten.conv2d.default},
    "linear": {aten.linear.default},
    "add": ADDS,
    "mul": MULS,
    "cat": {aten.cat.default},
    "mean": AVERAGES,
    "sigmoid": {aten.sigmoid.default, aten.sigmoid_.default},
    "hardsigmoid": {aten.hardsigmoid.default, aten.hardsigmoid_.default},
    "hardswish": {aten.hardswish.default, aten.hardswish_.default},
    "silu": SILUS,  # never int8 as such: split_activations rewrites it
}
FAMILY = {op: family for family, ops in FAMILIES.items() for op in ops}
UNIT_RANGE = {"sigmoid", "hardsigmoid"}  # outputs in [0, 1]: a fixed scale of 1/256


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


WRAPPER = "model."  # EmbeddingModel's attribute: layer paths are the student's own


def layer_of(node: Node) -> str:
    """The path in the student of the module that computes ``node`` ("" for its own forward)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), ("",))[0]
    return "" if path == WRAPPER.rstrip(".") else path.removeprefix(WRAPPER)


def kept_float(layer: str, keep_float: Mapping[str, str]) -> str | None:
    """Why ``layer`` stays float by the first pattern of ``keep_float`` it matches, else None."""
    return next((why for pattern, why in keep_float.items() if fnmatchcase(layer, pattern)), None)


def annotation(node: Node) -> QuantizationAnnotation | None:
    return node.meta.get("quantization_annotation")


def quantized(node: object) -> bool:
    """Whether ``node``'s output is an int8 tensor in the annotated graph."""
    note = annotation(node) if hasattr(node, "meta") else None
    return note is not None and note.output_qspec is not None


def _constant(model: GraphModule, value: float) -> Node:
    """A get_attr node of the scalar ``value``, a buffer of ``model`` (a quantizable input)."""
    name = f"_edgepc_constant_{str(value).replace('.', '_').replace('-', 'm')}"
    if not hasattr(model, name):
        model.register_buffer(name, torch.full((1, 1, 1, 1), value))
    return model.graph.get_attr(name)


def _int8_mean(node: Node, recipe: Recipe) -> bool:
    """Whether ``recipe`` runs the mean ``node`` in int8: any mean, or a global one (over both
    spatial axes of a 4-D tensor, dims kept: the exporter writes it as GlobalAveragePool)."""
    if "mean" in recipe.int8_ops:
        return True
    if "global mean" not in recipe.int8_ops:
        return False
    x = node.args[0]
    if len(getattr(x, "meta", {}).get("val", torch.empty(0)).shape) != 4:
        return False
    if node.target == aten.adaptive_avg_pool2d.default:
        return list(node.args[1]) in ([1, 1], [1])
    if node.target == aten.mean.dim:
        dims, keepdim = node.args[1], (*node.args[2:], node.kwargs.get("keepdim", False))[0]
        return keepdim and sorted(d % 4 for d in dims) == [2, 3]
    return False


def split_activations(model: GraphModule, recipe: Recipe) -> int:
    """Rewrite the activations of ``recipe.split`` into int8 ops of its runtime, with the same
    values: SiLU as ``x · sigmoid(x)``; HardSigmoid as ``relu6(x + 3) · 1/6`` and HardSwish as
    ``x`` times that (as TensorFlow's MobileNetV3 writes them). Returns how many."""
    graph = model.graph
    found = [
        n for n in graph.nodes if n.op == "call_function" and FAMILY.get(n.target) in recipe.split
    ]
    for node in found:
        family, x = FAMILY[node.target], node.args[0]

        def call(op: object, *args: object, node: Node = node) -> Node:
            new = graph.call_function(op, args)
            new.meta = dict(node.meta)  # its layer, for the precision plan
            return new

        with graph.inserting_before(node):
            if family == "silu":
                gate = call(aten.sigmoid.default, x)
            else:
                shifted = call(aten.add.Tensor, x, _constant(model, 3.0))
                gate = call(aten.mul.Tensor, call(aten.hardtanh.default, shifted, 0.0, 6.0),
                            _constant(model, 1 / 6))  # fmt: skip
            out = gate if family == "hardsigmoid" else call(aten.mul.Tensor, x, gate)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    if found:
        model.recompile()
    return len(found)


def annotate(
    graph: torch.fx.Graph,
    recipe: Recipe,
    activation: QuantizationSpec,
    weight: QuantizationSpec,
    keep_float: Mapping[str, str] | None = None,
) -> None:
    """Mark where ``graph`` (an exported student) is quantized for ``recipe``, as PT2E
    annotations, in place; the layers ``keep_float`` matches stay float."""
    from torchao.quantization.pt2e.quantizer import (
        FixedQParamsQuantizationSpec,
        QuantizationAnnotation,
        SharedQuantizationSpec,
    )

    info = torch.iinfo(recipe.activation_dtype)
    unit = FixedQParamsQuantizationSpec(
        dtype=recipe.activation_dtype, scale=1 / 256, zero_point=info.min,
        quant_min=info.min, quant_max=info.max, qscheme=torch.per_tensor_affine,
    )  # fmt: skip

    def mark(node: Node, inputs: dict | None = None, output: object = None) -> None:
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map=inputs or {}, output_qspec=output, _annotated=True
        )

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

    for node in graph.nodes:
        if node.op != "call_function" or annotation(node) is not None:
            continue
        if keep_float and kept_float(layer_of(node), keep_float) is not None:
            continue
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        family = FAMILY.get(node.target)
        if family in ("conv", "linear"):
            group(node, {args[0]: activation, args[1]: weight}, (NORMS, CLAMPS))
        elif family in ("add", "mul") and len(args) == 2 and family in recipe.int8_ops:
            group(node, {a: activation for a in args}, (CLAMPS,))  # not a counter += 1
        elif family == "cat":
            mark(node, {a: activation for a in node.args[0]}, activation)
        elif family in ("sigmoid", "hardsigmoid", "hardswish") and family in recipe.int8_ops:
            mark(node, {args[0]: activation}, unit if family in UNIT_RANGE else activation)
        elif family == "mean" and quantized(args[0]) and _int8_mean(node, recipe):
            mark(node, {args[0]: activation}, activation)
        elif node.target in KEEP_SCALE and quantized(args[0]):
            mark(node, {args[0]: activation}, SharedQuantizationSpec((args[0], node)))
        elif node.target in SPLITS and quantized(args[0]):  # int8 in, int8 parts out
            mark(node, {args[0]: activation})
            for part in node.users:
                mark(part, {}, SharedQuantizationSpec((args[0], node)))


def quantizer(
    target: str, qat: bool, bits: int | None = None, keep_float: Mapping[str, str] | None = None
) -> Quantizer:
    """The PT2E quantizer of ``target`` (fake-quant modules for QAT, observers for PTQ) with
    ``bits``-bit weights (None: the recipe's), leaving float the layers ``keep_float`` ({layer
    pattern: why}) matches. Once it has annotated a graph, its ``plan`` is that graph's
    precision plan."""
    from torchao.quantization.pt2e.quantizer import Quantizer

    from edgepc.quant.plan import precision_plan

    rules = recipe(target)
    activation, weight = _specs(rules, qat, weight_bits(target, bits))
    keep = dict(keep_float or {})

    class EdgeQuantizer(Quantizer):
        plan: PrecisionPlan | None = None

        def transform_for_annotation(self, model: GraphModule) -> GraphModule:
            split_activations(model, rules)
            return model

        def annotate(self, model: GraphModule) -> GraphModule:
            annotate(model.graph, rules, activation, weight, keep)
            self.plan = precision_plan(model.graph, rules, keep)
            return model

        def validate(self, model: GraphModule) -> None:
            pass

    return EdgeQuantizer()
