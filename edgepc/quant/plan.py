"""The precision plan of an int8 artifact: which layers of the student run in int8 and which stay
float, and why. It is read from the graph the recipe annotated (:mod:`edgepc.quant.recipes`), so
it states what the exported file holds, and the same student and recipe always give it."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from edgepc.quant.recipes import (
    CLAMPS,
    FAMILY,
    KEEP_SCALE,
    NORMS,
    SPLITS,
    Recipe,
    annotation,
    kept_float,
    layer_of,
)


@dataclass(frozen=True)
class LayerPrecision:
    layer: str  # the module's path in the student ("" for ops of its own forward)
    ops: tuple[str, ...]  # op families it computes ("conv", "hardswish", "mul" ...)
    int8: bool
    reason: str = ""  # why it stays float
    kind: str = ""  # what a speed choice groups it by: "depthwise conv", "1×1 conv", "mul" ...


@dataclass(frozen=True)
class PrecisionPlan:
    runtime: str
    layers: tuple[LayerPrecision, ...]

    @property
    def float_layers(self) -> list[LayerPrecision]:
        return [layer for layer in self.layers if not layer.int8]

    def summary(self) -> str:
        """One line: ``int8 layers: 66 of 94; float: 19 hardswish, 9 hardsigmoid (no int8
        kernel in onnxruntime)``."""
        line = f"int8 layers: {len(self.layers) - len(self.float_layers)} of {len(self.layers)}"
        by_reason: dict[str, Counter[str]] = {}
        for layer in self.float_layers:
            by_reason.setdefault(layer.reason, Counter())["+".join(layer.ops)] += 1
        parts = [
            f"{', '.join(f'{n} {ops}' for ops, n in kinds.most_common())} ({reason})"
            for reason, kinds in by_reason.items()
        ]
        return line + (f"; float: {'; '.join(parts)}" if parts else "")

    def to_json(self) -> dict:
        return {"runtime": self.runtime, "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_json(cls, record: dict) -> PrecisionPlan:
        layers = (LayerPrecision(**(r | {"ops": tuple(r["ops"])})) for r in record["layers"])
        return cls(record["runtime"], tuple(layers))


def _op(node: torch.fx.Node) -> str | None:
    """The op family a plan lists ``node`` under; None for ops that compute nothing of their
    own on the data (layout, a batch norm: part of its conv, a clamp fused into the int8 op
    before it)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return None
    if all(arg.op == "get_attr" for arg in node.all_input_nodes):
        return None  # off the data path, e.g. a training batch norm's counter += 1
    if not isinstance(node.meta.get("val"), torch.Tensor | None):
        return None  # shape arithmetic (a dynamic batch's size), no tensor
    if node.target in KEEP_SCALE or node.target in SPLITS:
        return None
    if node.target in NORMS:
        return None  # folded into its conv (PTQ) or trained beside it (QAT)
    if node.target in CLAMPS and annotation(node) is not None:
        return None
    if node.target in FAMILY:
        return FAMILY[node.target]
    return getattr(node.target, "_opname", str(node.target))


def _kind(node: torch.fx.Node, family: str) -> str:
    """``family``, and for a convolution its kind, since int8 kernels win or lose by kind."""
    weight = node.args[1] if family == "conv" else None
    shape = getattr(weight, "meta", {}).get("val")
    if shape is None:
        return family
    groups = node.args[6] if len(node.args) > 6 else 1
    if groups > 1:
        return "depthwise conv"
    return "1×1 conv" if shape.shape[2:].numel() == 1 else "conv"


def precision_plan(
    graph: torch.fx.Graph, recipe: Recipe, keep_float: Mapping[str, str] | None = None
) -> PrecisionPlan:
    """The plan of ``graph``, annotated for ``recipe`` with the layers ``keep_float`` matches
    left float: a layer is int8 when every op it computes takes int8 inputs."""
    ops: dict[str, list[tuple[str, bool, str]]] = {}
    kinds: dict[str, str] = {}
    for node in graph.nodes:
        family = _op(node)
        if family is None:
            continue
        layer = layer_of(node)
        int8 = annotation(node) is not None
        reason = ""
        if not int8:
            reason = kept_float(layer, keep_float or {}) or (
                "after a float layer"
                if node.target in CLAMPS
                else recipe.float_reason
                if family not in recipe.int8_ops
                else "float input or constant operand"
            )
        ops.setdefault(layer, []).append((family, int8, reason))
        kinds.setdefault(layer, _kind(node, family))
    layers = tuple(
        LayerPrecision(
            layer,
            tuple(dict.fromkeys(family for family, _, _ in computed)),
            all(int8 for _, int8, _ in computed),
            next((reason for _, int8, reason in computed if not int8), ""),
            kinds[layer],
        )
        for layer, computed in ops.items()
    )
    return PrecisionPlan(recipe.runtime, layers)
