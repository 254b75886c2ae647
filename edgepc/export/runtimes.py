"""The real runtimes behind one call: normalised float32 NCHW images -> (logits, embedding).

onnxruntime (CPU) runs ``.onnx`` at any batch; the LiteRT interpreter (XNNPACK) runs ``.tflite``
at batch 1, image by image, quantizing an int8 input and dequantizing int8 outputs with the
scales stored in the file. Only numpy and the runtime's own package are used here.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from edgepc.export.writers import OUTPUTS, ExportError, missing, quiet_native_logs

if TYPE_CHECKING:
    import onnxruntime


@dataclass
class Runtime:
    """A loaded model file: ``run(x)`` takes at most ``max_batch`` images at once."""

    name: str  # e.g. "onnxruntime 1.32.0"
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    max_batch: int | None
    input_quantization: tuple[float, int] | None = None  # (scale, zero-point) of an int8 input

    def predict(
        self, x: np.ndarray, batch_size: int = 500, progress: bool = False, desc: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and embeddings of all of ``x``, in chunks the runtime takes."""
        step = min(batch_size, self.max_batch or batch_size)
        starts = tqdm(range(0, len(x), step), desc=desc, disable=not progress, leave=False)
        parts = [self.run(x[i : i + step]) for i in starts]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def x86_without_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """An x86 CPU without VNNI (AVX-512 VNNI or AVX-VNNI) by its flags in ``cpuinfo``, or one
    whose flags cannot be read. There onnxruntime's fast uint8 × int8 kernels add each pair of
    products in a saturating int16 (``vpmaddubsw``): int8 logits drift from the PyTorch graph."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return not {"avx512_vnni", "avx_vnni"} & set(flags)


def onnx_session_options(threads: int, exact: bool | None = None) -> onnxruntime.SessionOptions:
    """``threads`` intra-op threads, ops one at a time; ``exact`` (default: on
    :func:`x86_without_vnni` CPUs) the exact uint8 × uint8 int8 kernels (slower, no saturation).
    Not elsewhere: onnxruntime would take the slower kernels on VNNI CPUs too."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if x86_without_vnni() if exact is None else exact:
        options.add_session_config_entry("session.x64quantprecision", "1")
    return options


def onnx_runtime(path: Path, threads: int) -> Runtime:
    """onnxruntime's CPU provider with :func:`onnx_session_options`."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise missing("onnxruntime", "cpu") from None
    exact = x86_without_vnni()
    options = onnx_session_options(threads, exact)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (feed,) = (i.name for i in session.get_inputs())

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = session.run(list(OUTPUTS), {feed: x})
        return logits, embedding

    name = f"onnxruntime {ort.__version__}" + (" (exact int8: no VNNI)" if exact else "")
    return Runtime(name, run, None)


def litert_runtime(path: Path, threads: int) -> Runtime:
    """The LiteRT interpreter (``ai_edge_litert``, XNNPACK) with ``threads`` threads."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise missing("ai-edge-litert", "mobile") from None
    with quiet_native_logs():  # "Created TensorFlow Lite XNNPACK delegate", every time
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    # litert-torch names outputs by position: output_0 is logits, output_1 the embedding.
    outs = sorted(interpreter.get_output_details(), key=lambda o: o["name"])
    if len(outs) != len(OUTPUTS):
        raise ExportError(f"{path} has {len(outs)} outputs, expected {len(OUTPUTS)}: {OUTPUTS}")
    scale, zero = inp["quantization"]
    int8 = inp["dtype"] == np.int8

    def one(image: np.ndarray) -> list[np.ndarray]:
        if int8:
            image = np.clip(np.round(image / scale) + zero, -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        got = []
        for out in outs:
            value = interpreter.get_tensor(out["index"])[0]
            if out["dtype"] == np.int8:
                s, z = out["quantization"]
                value = (value.astype(np.float32) - z) * np.float32(s)
            got.append(value)
        return got

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = [one(image) for image in x]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    name = f"ai-edge-litert {_version('ai-edge-litert')}"
    return Runtime(name, run, 1, (float(scale), int(zero)) if int8 else None)


RUNTIMES = {".onnx": onnx_runtime, ".tflite": litert_runtime}


def open_runtime(path: Path, threads: int = 1) -> Runtime:
    """The runtime for ``path``'s format, with its thread count pinned."""
    try:
        opener = RUNTIMES[path.suffix]
    except KeyError:
        raise ExportError(f"no runtime for {path.name}: edgepc runs {sorted(RUNTIMES)}") from None
    return opener(path, threads)


def normalise(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std, bit for bit what
    :class:`edgepc.distill.images.Normalisation` computes."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - m) / s
