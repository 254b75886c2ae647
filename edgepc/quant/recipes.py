"""What int8 means on each target, as a PT2E quantizer (torchao), and which layers it takes.

All three targets use int8 weights, symmetric per output channel (axis 0, range ±127, zero-point
0) and per-tensor int8 activations. They differ in the activations' zero-point:

- ``jetson``: TensorRT executes only symmetric quantization, so activations are symmetric too
  (zero-point 0 everywhere);
- ``cpu`` (onnxruntime QDQ) and ``mobile`` (LiteRT full-integer, the TFLite int8 spec) take
  affine activations, which keep a full 8 bits for non-negative (post-ReLU) tensors.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgepc.errors import QuantError

if TYPE_CHECKING:
    from torchao.quantization.pt2e.quantizer import Quantizer


@dataclass(frozen=True)
class Recipe:
    target: str
    symmetric_activations: bool
    runtime: str


RECIPES = {
    "jetson": Recipe("jetson", True, "TensorRT explicit quantization (Q/DQ, zero-point 0)"),
    "cpu": Recipe("cpu", False, "onnxruntime int8 QDQ"),
    "mobile": Recipe("mobile", False, "LiteRT full-integer int8"),
}

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
    if target not in RECIPES:
        known = ", ".join(RECIPES)
        raise QuantError(f"no int8 recipe for target {target!r}: choose one of {known}")
    return RECIPES[target]


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


def quantizer(target: str, qat: bool) -> Quantizer:
    """The torchao PT2E quantizer of ``target`` (fake-quant modules for QAT, observers for PTQ)."""
    with warnings.catch_warnings():  # the XNNPACK quantizer's location is marked deprecated
        warnings.simplefilter("ignore")
        from torchao.testing.pt2e._xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        config = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)
        if recipe(target).symmetric_activations:
            act = dataclasses.replace(config.input_activation, qscheme=torch.per_tensor_symmetric)
            config = dataclasses.replace(config, input_activation=act, output_activation=act)
        return XNNPACKQuantizer().set_global(config)
