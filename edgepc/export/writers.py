"""ONNX and TFLite files from a model whose ``forward(x) -> (logits, embedding)``: an fp32
student or the int8 graph of :func:`edgepc.quant.convert`. Files appear complete or not at all."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from edgepc.errors import EdgepcError

INPUT = "images"
OUTPUTS = ("logits", "embedding")


class ExportError(EdgepcError):
    """A model cannot be written for a runtime, or the runtime's package is missing."""


def _missing(package: str, extra: str) -> ExportError:
    return ExportError(f"{package} is not installed: pip install -e '.[{extra}]'")


def _replace_atomically(tmp: Path, path: Path) -> Path:
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = 18) -> Path:
    """ONNX with a dynamic batch (torch's dynamo exporter); int8 graphs become QDQ ONNX."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError:
        raise _missing("onnxscript", "cpu") from None
    tmp = path.with_name(f".{path.name}.tmp")
    batch = Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    return _replace_atomically(tmp, path)


def write_tflite(model: nn.Module, example: torch.Tensor, path: Path, int8: bool) -> Path:
    """A .tflite at batch 1 via litert-torch; ``int8``: full-integer (int8 input and outputs)
    from an int8 graph of :func:`edgepc.quant.convert`."""
    try:
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
    except ImportError:
        raise _missing("litert-torch", "mobile") from None
    quant_config = None
    if int8:  # the converter reads only the mode (static int8) from this quantizer
        static = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
        quant_config = QuantConfig(pt2e_quantizer.PT2EQuantizer().set_global(static))
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
        model = model.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        litert_torch.convert(model, (example[:1],), quant_config=quant_config).export(str(tmp))
    return _replace_atomically(tmp, path)
