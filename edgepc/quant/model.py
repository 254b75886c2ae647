"""A student with int8 quantization simulated in its graph, and the way to real int8.

``prepare`` exports the fp32 student with torch.export (dynamic batch), then inserts fake-quant
modules (QAT: batch norm still trains and is folded into the conv weights as it goes) or
observers (PTQ: batch norm folded first, then calibration). ``convert`` turns either into the
reference int8 graph (quantize/dequantize pairs around float ops) that the ONNX and LiteRT
converters lower to int8 kernels.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

from edgepc.errors import QuantError
from edgepc.models import EmbeddingModel
from edgepc.quant import recipes
from edgepc.quant.plan import PrecisionPlan
from edgepc.quant.recipes import quantizer

MAX_BATCH = 4096


class QuantModel(nn.Module):
    """``forward(x) -> (logits, embedding)`` of the fake-quant graph, with working ``train()`` /
    ``eval()``: an exported graph needs its batch-norm and dropout ops swapped, and observers
    only run while training (and not at all once frozen)."""

    def __init__(
        self, graph: torch.fx.GraphModule, target: str, qat: bool, weight_bits: int | None = None
    ) -> None:
        super().__init__()
        self.graph = graph
        self.target = target
        self.qat = qat
        self.weight_bits = recipes.weight_bits(target, weight_bits)
        self.observers_frozen = False
        self.plan: PrecisionPlan | None = None  # set by prepare
        self.train(qat)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # fake quant is float32 arithmetic
            logits, embedding = self.graph(x.float())
        return logits, embedding

    def train(self, mode: bool = True) -> QuantModel:
        from torchao.quantization.pt2e import (
            disable_observer,
            enable_observer,
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )

        self.training = mode
        if self.qat:
            with _memoised_patterns():
                (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
            observe = mode and not self.observers_frozen
            self.graph.apply(enable_observer if observe else disable_observer)
        return self

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor]) -> None:
        """Run normalised ``batches`` through the eval-mode graph with observers on: PTQ's
        calibration, and QAT's starting scales."""
        from torchao.quantization.pt2e import enable_observer

        mode = self.training
        self.train(False)
        self.graph.apply(enable_observer)
        for x in batches:
            self(x)
        self.train(mode)

    def freeze_observers(self) -> None:
        """Keep the current scales for the rest of fine-tuning (weights still train)."""
        self.observers_frozen = True
        self.train(self.training)


def prepare(
    model: EmbeddingModel,
    target: str,
    example: Tensor,
    qat: bool = True,
    weight_bits: int | None = None,
    keep_float: Mapping[str, str] | None = None,
) -> QuantModel:
    """A fake-quant copy of ``model`` for ``target``'s int8 recipe, with ``weight_bits``-bit
    weights (None: the recipe's) and the layers ``keep_float`` ({layer pattern: why}) matches
    left float (see :mod:`edgepc.quant.recipes`). The original is untouched.

    ``example`` is a normalised input batch of at least 2 images (batch norm trains in QAT).
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    model = copy.deepcopy(model).to("cpu").train(qat)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (example.cpu(),), dynamic_shapes=({0: batch},))
        insert = prepare_qat_pt2e if qat else prepare_pt2e
        marks = quantizer(target, qat, weight_bits, keep_float)
        with _memoised_patterns():
            graph = insert(exported.module(), marks)
    quant = QuantModel(graph, target, qat, weight_bits)
    quant.plan = marks.plan
    return quant


def restore(
    model: EmbeddingModel,
    target: str,
    example: Tensor,
    state: dict,
    qat: bool = True,
    weight_bits: int | None = None,
    keep_float: Mapping[str, str] | None = None,
) -> QuantModel:
    """A quantized model saved as ``QuantModel.state_dict()``, rebuilt on its fp32 student."""
    quant = prepare(model, target, example, qat, weight_bits, keep_float)
    try:
        quant.load_state_dict(state)
    except (RuntimeError, KeyError) as error:
        raise QuantError(
            f"saved {target} int8 state does not fit this student ({type(error).__name__}): "
            "it was made from another model or recipe; rerun the qat stage"
        ) from None
    if qat:  # scales are final once saved
        quant.freeze_observers()
    return quant


def quantized(model: QuantModel) -> QuantModel:
    """The int8 graph of ``model`` (see :func:`convert`) behind the same interface, for scoring
    what the runtimes will execute. PTQ needs it: its prepared graph only observes."""
    reference = QuantModel(convert(model), model.target, qat=False, weight_bits=model.weight_bits)
    reference.plan = model.plan
    return reference


def convert(model: QuantModel) -> torch.fx.GraphModule:
    """The int8 reference graph (quantize → dequantize → float op → quantize ...), eval mode.

    Quantized weights are not folded into int8 constants (``fold_quantize=False``): LiteRT's
    converter needs the pattern, and the ONNX exporter turns it into QuantizeLinear nodes.
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    graph = copy.deepcopy(model.graph).cpu()
    with warnings.catch_warnings(), _memoised_patterns():
        warnings.simplefilter("ignore")
        move_exported_model_to_eval(graph)
        graph = convert_pt2e(graph, fold_quantize=False)
    if recipes.recipe(
        model.target
    ).int32_bias:  # onnxruntime's QLinearConv/QGemm, TFLite's int8 spec
        round_biases(graph)
    return graph


def round_biases(graph: torch.fx.GraphModule) -> int:
    """Round each float bias of a conv / linear with quantized input and weights to the int32
    grid its runtime computes with (multiples of input scale × weight scale per channel), so
    the int8 graph adds the bias the runtime adds. A deep network amplifies the difference:
    left in float, MobileNetV2's logits in onnxruntime differed from this graph's on 7 % of
    images. The file still holds the (rounded) float bias; the runtime quantizes it exactly.
    Returns how many biases were rounded."""
    decomposed = torch.ops.quantized_decomposed
    rounded = 0
    for node in graph.graph.nodes:
        if node.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            continue
        x, w, b = (*node.args, None)[:3]
        if not (
            isinstance(b, torch.fx.Node) and b.op == "get_attr"
            and getattr(x, "target", None) == decomposed.dequantize_per_tensor.default
            and getattr(w, "target", None) == decomposed.dequantize_per_channel.default
        ):  # fmt: skip
            continue
        scale = w.args[1]
        if not isinstance(scale, torch.fx.Node) or scale.op != "get_attr":
            continue
        bias = operator.attrgetter(b.target)(graph)
        step = float(x.args[1]) * operator.attrgetter(scale.target)(graph).double()
        with torch.no_grad():
            bias.copy_((bias.double() / step).round() * step)
        rounded += 1
    return rounded


# torchao traces each pattern it rewrites with torch.export: about 100 conv-bn patterns per
# prepare or convert, and 6 dropout and batch-norm patterns at every train()/eval() of an
# exported model (0.2 to 0.5 s each on a CPU). They are the same graphs every time, since a
# pattern depends only on its flags and the shapes of its example inputs: they are kept for the
# process. qat_utils binds the tracer at import; export_utils imports it from utils at each call.
_PATTERNS: dict[tuple, torch.fx.GraphModule] = {}


# torchao also rewrites conv1d and transposed-conv patterns with their batch norms (72 of the 96
# it traces per convert). No recipe quantizes those layers, so they stay float and their batch
# norm need not be folded: they are given a pattern that matches nothing, and run as written.
_ABSENT_CONVS = (F.conv1d, F.conv_transpose1d, F.conv_transpose2d)


def _matches_nothing() -> torch.fx.GraphModule:
    """A pattern graph of one op that no prepared graph holds (see ``_ABSENT_CONVS``)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.conv_transpose1d.default, (x, x)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@contextlib.contextmanager
def _memoised_patterns() -> Iterator[None]:
    from torchao.quantization.pt2e import qat_utils, utils

    trace = utils._get_aten_graph_module_for_pattern

    def memoised(pattern: Callable, example_inputs: tuple, is_cuda: bool = False, **kwargs: Any):
        if any(any(v is conv for conv in _ABSENT_CONVS) for v in _closed_over(pattern)):
            return _matches_nothing()
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return trace(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERNS:
            _PATTERNS[key] = trace(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERNS[key])

    qat_utils._get_aten_graph_module_for_pattern = memoised
    utils._get_aten_graph_module_for_pattern = memoised
    try:
        yield
    finally:
        qat_utils._get_aten_graph_module_for_pattern = trace
        utils._get_aten_graph_module_for_pattern = trace


def _closed_over(pattern: Callable) -> tuple:
    """The values a pattern function closes over (torchao wraps some in a WrapperModule)."""
    fn = getattr(pattern, "fn", pattern)
    return tuple(c.cell_contents for c in getattr(fn, "__closure__", None) or ())


def _pattern_key(pattern: Callable, inputs: tuple, is_cuda: bool, kwargs: dict) -> tuple | None:
    """What a traced pattern depends on: its code, the values it closes over (flags, the conv
    function) and the shapes and dtypes of its inputs; None when something is not hashable."""

    def shape(value: object) -> object:
        return (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else value

    fn = getattr(pattern, "fn", pattern)
    if not hasattr(fn, "__code__"):
        return None
    key = (type(pattern), fn.__code__, _closed_over(pattern), tuple(map(shape, inputs)), is_cuda,
           tuple(sorted((k, shape(v)) for k, v in kwargs.items())))  # fmt: skip
    try:
        hash(key)
    except TypeError:
        return None
    return key
