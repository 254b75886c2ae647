"""Every deployment target in one table: what int8 means for its runtime, the file it gets,
who runs that file, how it is checked, and what runs it on the device. Everything else in
edgepc reads :data:`TARGETS`; adding a target is one :class:`Target` record here (with its
``edgepc/configs/<name>.yaml``) and, if its runtime is new, a command in ``edgepc_device``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator
from torch import nn

from edgepc.errors import EdgepcError
from edgepc.export.tensorrt import check_onnx
from edgepc.export.writers import ExportError, write_onnx, write_tflite
from edgepc.quant.recipes import LITERT_INT8, ONNXRUNTIME_QDQ, TENSORRT_QDQ, Recipe

# (model, example batch, path, int8) -> the written file
Writer = Callable[[nn.Module, torch.Tensor, Path, bool], Path]


@dataclass(frozen=True)
class Parity:
    """How closely an int8 file must reproduce its PyTorch graph (edgepc.export.parity)."""

    top1_agreement: float
    max_logit_delta: float  # relative to the largest |logit| of the reference
    pc_triplet_agreement: float


@dataclass(frozen=True)
class Target:
    name: str
    recipe: Recipe  # int8 as the runtime's kernels take it (edgepc.quant.recipes)
    model_file: str  # the model's file name in a bundle
    writer: Writer
    runtime: str  # the package that runs the file (a bundle manifest's ``runtime``)
    device_command: str  # what validates a bundle on the device (edgepc_device)
    latency: str  # what the validate stage's latency stands for
    int8_parity: Parity = Parity(0.95, 0.15, 0.9)
    tensorrt_engine: bool = False  # built from the file where TensorRT is, else on the device
    host_is_device: bool = False  # the host runs the file as the device does: its speed counts

    def write(self, model: nn.Module, example: torch.Tensor, folder: Path, int8: bool) -> Path:
        """``model`` as this target's file in ``folder``."""
        return self.writer(model, example, folder / self.model_file, int8)


def _write_cpu(model: nn.Module, example: torch.Tensor, path: Path, int8: bool) -> Path:
    return write_onnx(model, example, path, int8_weights=int8)


def _write_tensorrt(model: nn.Module, example: torch.Tensor, path: Path, int8: bool) -> Path:
    """ONNX that TensorRT builds: int8 weights behind DequantizeLinear (TensorRT's explicit
    quantization takes them as constants; a quarter of fp32's bytes), activations as Q/DQ
    pairs, checked for ops its parser lacks (:func:`edgepc.export.tensorrt.check_onnx`)."""
    write_onnx(model, example, path, int8_weights=int8)
    if int8:
        try:
            check_onnx(path)
        except ExportError:
            path.unlink()
            raise
    return path


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "cpu", ONNXRUNTIME_QDQ, "model.onnx", _write_cpu, "onnxruntime",
            "python3 -m edgepc_device cpu",
            "onnxruntime on this machine's CPU: the target itself",
            host_is_device=True,
        ),
        Target(
            "mobile", LITERT_INT8, "model.tflite", write_tflite, "ai-edge-litert",
            "python3 -m edgepc_device mobile",
            "the LiteRT interpreter (XNNPACK) on this machine's CPU; a phone's cores differ: "
            "its own numbers come from the device command",
        ),
        Target(
            "jetson", TENSORRT_QDQ, "model.onnx", _write_tensorrt, "tensorrt",
            "python3 -m edgepc_device jetson",
            "onnxruntime on this machine's CPU, a stand-in: the TensorRT engine is built and "
            "timed on the device (`engine` in each manifest.json)",
            tensorrt_engine=True,
        ),
    )
}  # fmt: skip


def known_target(name: str) -> str:
    """``name``, if it is a target: the validator of every ``target`` field."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}: edgepc has {', '.join(TARGETS)}")
    return name


TargetName = Annotated[str, AfterValidator(known_target)]


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise EdgepcError(f"unknown target {name!r}: edgepc has {', '.join(TARGETS)}") from None
