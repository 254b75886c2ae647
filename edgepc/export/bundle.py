"""Bundles: one folder per deployable artifact, what a device needs and nothing else.

    <bundle>/model.onnx | model.tflite   the model (input "images", outputs logits, embedding)
    <bundle>/testset.npz                  uint8 test images, labels, the teacher's embeddings
    <bundle>/manifest.json                what the files are, how to feed them, their sha256

The model file is written by the target's writer (:data:`edgepc.targets.TARGETS`); the device
reads the bundle with :mod:`edgepc_device.bundle`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from edgepc import __version__
from edgepc.errors import first_problem
from edgepc.export.writers import ExportError
from edgepc.files import atomic_path, write_text
from edgepc.targets import TargetName, get_target
from edgepc_device import bundle as device
from edgepc_device.bundle import INPUT, MANIFEST, OUTPUTS, SCHEMA_VERSION, TESTSET, sha256


class BundleError(ExportError, device.BundleError):
    """A bundle is malformed, incomplete or does not match its manifest."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quantization(_Strict):
    scale: float = Field(gt=0)
    zero_point: int


class TensorSpec(_Strict):
    name: str
    shape: list[int | str]  # "batch" where it is dynamic
    dtype: Literal["float32", "int8", "uint8"]
    layout: str | None = None
    quantization: Quantization | None = None  # of the int8 tensor, or of the first Q node


class FileEntry(_Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _inside(cls, path: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", path) or path in (".", ".."):
            raise ValueError(f"{path!r} is not a plain file name inside the bundle")
        return path


class Normalise(_Strict):
    """float input = (uint8 / 255 - mean) / std, per channel."""

    mean: list[float]
    std: list[float]


class Engine(_Strict):
    """How the TensorRT engine is (or will be) built from the bundle's ONNX."""

    status: Literal["deferred to device", "built"]
    trtexec: str
    python: str
    path: str | None = None


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9_-]+$")  # e.g. cpu-int8, also the registry alias
    target: TargetName
    precision: Literal["fp32", "int8"]
    source: Literal["fp32", "qat", "ptq"]  # which PyTorch model it was exported from
    runtime: str  # the package that runs it
    model: str  # the model file, one of ``files``
    input: TensorSpec
    outputs: list[TensorSpec]
    normalisation: Normalise
    classes: list[str]
    testset: str
    files: list[FileEntry]
    edgepc_version: str
    mlflow_run_id: str | None = None
    engine: Engine | None = None
    precision_plan: dict | None = None  # int8 files: edgepc.quant.PrecisionPlan.to_json()

    def entry(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.path == name:
                return entry
        raise BundleError(f"manifest {self.name!r} lists no file {name!r}")


def file_entry(path: Path) -> FileEntry:
    return FileEntry(path=path.name, sha256=sha256(path), bytes=path.stat().st_size)


def write_testset(
    path: Path, images: np.ndarray, labels: np.ndarray, teacher_embeddings: np.ndarray
) -> Path:
    """The on-device test set: uint8 images (N, C, H, W), int64 labels, and the teacher's
    embeddings of the first images (for pc_* without the teacher)."""
    with atomic_path(path) as tmp:
        np.savez_compressed(
            tmp,
            images=images.astype(np.uint8),
            labels=labels.astype(np.int64),
            teacher_embeddings=teacher_embeddings.astype(np.float32),
        )
    return path


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    """Written last (atomically): a bundle with a manifest is complete."""
    return write_text(folder / MANIFEST, manifest.model_dump_json(indent=2))


def read_manifest(folder: Path, verify: bool = True) -> Manifest:
    """The bundle's manifest, checked against the schema; with ``verify`` every listed file
    must exist with its recorded size and sha256."""
    path = folder / MANIFEST
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise BundleError(
            f"{folder} has no {MANIFEST}: not a bundle, or its export was cut short"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path} is not valid JSON ({error}): export the bundle again") from None
    except ValidationError as error:
        raise BundleError(f"{path}: {first_problem(error)}: export the bundle again") from None
    for name in (manifest.model, manifest.testset):
        manifest.entry(name)
    if verify:
        try:
            device.verify_files(folder, [entry.model_dump() for entry in manifest.files])
        except device.BundleError as error:
            raise BundleError(str(error)) from None
    return manifest


def _dtype(value: object) -> str:
    return np.dtype(value).name


def _onnx_specs(path: Path) -> tuple[TensorSpec, list[TensorSpec]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def quantization(node: onnx.NodeProto | None) -> Quantization | None:
        if node is None or not all(i in consts for i in node.input[1:3]):
            return None
        scale, zero = (consts[i] for i in node.input[1:3])
        return Quantization(scale=float(scale), zero_point=int(zero))

    def spec(
        value: onnx.ValueInfoProto, node: onnx.NodeProto | None, layout: str | None = None
    ) -> TensorSpec:
        dims = value.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else "batch" for d in dims]
        dtype = _dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        return TensorSpec(name=value.name, shape=shape, dtype=dtype, layout=layout,
                          quantization=quantization(node))  # fmt: skip

    (inp,) = model.graph.input
    first_q = next((n for n in model.graph.node if n.op_type == "QuantizeLinear"
                    and n.input[0] == inp.name), None)  # fmt: skip
    producers = {o: n for n in model.graph.node for o in n.output}
    outs = []
    for value in model.graph.output:
        node = producers.get(value.name)
        outs.append(spec(value, node if node is not None and node.op_type == "DequantizeLinear"
                         else None))  # fmt: skip
    return spec(inp, first_q, "NCHW"), outs


def _tflite_specs(path: Path) -> tuple[TensorSpec, list[TensorSpec]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))

    def spec(detail: dict, name: str, layout: str | None = None) -> TensorSpec:
        scale, zero = detail["quantization"]
        q = Quantization(scale=scale, zero_point=zero) if scale else None
        shape = [int(d) for d in detail["shape"]]
        return TensorSpec(name=name, shape=shape, dtype=_dtype(detail["dtype"]), layout=layout,
                          quantization=q)  # fmt: skip

    (inp,) = interpreter.get_input_details()
    outs = sorted(interpreter.get_output_details(), key=lambda o: o["name"])
    return spec(inp, INPUT, "NCHW"), [spec(o, n) for o, n in zip(outs, OUTPUTS, strict=True)]


def io_specs(path: Path) -> tuple[TensorSpec, list[TensorSpec]]:
    """The input and output tensors of a model file, as a device must feed and read them."""
    return {".onnx": _onnx_specs, ".tflite": _tflite_specs}[path.suffix](path)


def _link(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copyfile(source, target)


def write_bundle(
    folder: Path,
    model: nn.Module,
    example: torch.Tensor,
    target: str,
    source: str,
    testset: Path,
    normalisation: Normalise,
    classes: list[str],
    run_id: str | None = None,
    plan: dict | None = None,
) -> Manifest:
    """Write ``model`` (``source``: fp32, or the qat / ptq int8 graph) for ``target`` into
    ``folder`` with the test set and, last, the manifest (with the int8 graph's precision
    ``plan``). ``example``: a normalised batch."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = get_target(target)
    path = spec.write(model, example, folder, source != "fp32")
    _link(testset, folder / TESTSET)
    input_spec, output_specs = io_specs(path)
    manifest = Manifest(
        name=folder.name,
        target=target,
        precision="fp32" if source == "fp32" else "int8",
        source=source,
        runtime=spec.runtime,
        model=path.name,
        input=input_spec,
        outputs=output_specs,
        normalisation=normalisation,
        classes=classes,
        testset=TESTSET,
        files=[file_entry(path), file_entry(folder / TESTSET)],
        edgepc_version=__version__,
        mlflow_run_id=run_id,
        precision_plan=plan,
    )
    write_manifest(manifest, folder)
    return manifest


def trtexec_command(bundle: str, input_shape: list[int], int8: bool, max_batch: int = 64) -> str:
    """The trtexec line that builds the engine from a bundle's ONNX on the device: int8 from
    the Q/DQ graph (fp16 where no scale is given), or fp16 from an fp32 graph."""
    chw = "x".join(str(d) for d in input_shape[1:])
    return (
        f"trtexec --onnx={bundle}/model.onnx --saveEngine={bundle}/model.engine "
        f"{'--int8 ' if int8 else ''}--fp16 --minShapes={INPUT}:1x{chw} "
        f"--optShapes={INPUT}:1x{chw} "
        f"--maxShapes={INPUT}:{max_batch}x{chw}"
    )
