"""The real runtimes behind one call: normalised float32 NCHW images -> (logits, embedding).

onnxruntime (CPU) runs ``.onnx`` at any batch; the LiteRT interpreter (XNNPACK; ai-edge-litert or
tflite-runtime) runs ``.tflite`` at batch 1, image by image, quantizing an int8 input and
dequantizing int8 outputs with the scales stored in the file. TensorRT engines are in
:mod:`.jetson`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from edgepc_device.bundle import OUTPUTS

Outputs = tuple[np.ndarray, np.ndarray]  # logits, embedding


class MissingRuntimeError(ImportError):
    """The runtime's package is not installed here."""

    def __init__(self, package: str) -> None:
        super().__init__(f"{package} is not installed here: pip install numpy {package}")
        self.package = package


@dataclass
class Runtime:
    """A loaded model file: ``run(x)`` takes at most ``max_batch`` images at once."""

    name: str  # e.g. "onnxruntime 1.32.0"
    run: Callable[[np.ndarray], Outputs]
    max_batch: int | None
    input_quantization: tuple[float, int] | None = None  # (scale, zero-point) of int8 input

    def predict(
        self,
        x: np.ndarray,
        batch_size: int = 500,
        wrap: Callable[[Iterable[int]], Iterable[int]] = iter,
    ) -> Outputs:
        """Logits and embeddings of all of ``x``, in chunks the runtime takes (``wrap``: e.g. a
        progress bar around the chunks)."""
        step = min(batch_size, self.max_batch or batch_size)
        parts = [self.run(x[i : i + step]) for i in wrap(range(0, len(x), step))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Hold back what native code (TensorFlow/LiteRT's C++ logging) writes to stderr; it is
    shown only if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags in ``cpuinfo`` (Linux), or None where they cannot be read."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return None
    return set(next((line.split(":", 1)[1].split() for line in lines
                     if line.startswith("flags")), []))  # fmt: skip


def x86_without_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """An x86 CPU without VNNI (AVX-512 VNNI or AVX-VNNI) by its flags in ``cpuinfo``, or one
    whose flags cannot be read. There onnxruntime's fast uint8 × int8 kernels add each pair of
    products in a saturating int16 (``vpmaddubsw``): int8 logits drift from the PyTorch graph."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = cpu_flags(cpuinfo)
    return flags is None or not {"avx512_vnni", "avx_vnni"} & flags


def onnx_session_options(threads: int, exact: bool | None = None) -> Any:
    """onnxruntime ``SessionOptions``: ``threads`` intra-op threads, ops one at a time; ``exact``
    (default: on :func:`x86_without_vnni` CPUs) the exact uint8 × uint8 int8 kernels (slower,
    no saturation). Not elsewhere: onnxruntime would take the slower kernels on VNNI CPUs too."""
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
        raise MissingRuntimeError("onnxruntime") from None
    exact = x86_without_vnni()
    options = onnx_session_options(threads, exact)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (feed,) = (i.name for i in session.get_inputs())

    def run(x: np.ndarray) -> Outputs:
        logits, embedding = session.run(list(OUTPUTS), {feed: x})
        return logits, embedding

    name = f"onnxruntime {ort.__version__}" + (" (exact int8: no VNNI)" if exact else "")
    return Runtime(name, run, None)


def tflite_interpreter() -> tuple[type, str]:
    """(Interpreter, package) from ai-edge-litert, else tflite-runtime."""
    for module, package in (("ai_edge_litert.interpreter", "ai-edge-litert"),
                            ("tflite_runtime.interpreter", "tflite-runtime")):  # fmt: skip
        try:
            return __import__(module, fromlist=["Interpreter"]).Interpreter, package
        except ImportError:
            continue
    raise MissingRuntimeError("ai-edge-litert")


def litert_runtime(path: Path, threads: int) -> Runtime:
    """The LiteRT interpreter (XNNPACK) with ``threads`` threads."""
    interpreter_class, package = tflite_interpreter()
    with quiet_native_logs():  # "Created TensorFlow Lite XNNPACK delegate", every time
        interpreter = interpreter_class(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    # litert-torch names outputs by position: output_0 is logits, output_1 the embedding.
    outs = sorted(interpreter.get_output_details(), key=lambda o: o["name"])
    if len(outs) != len(OUTPUTS):
        raise ValueError(f"{path} has {len(outs)} outputs, expected {len(OUTPUTS)}: {OUTPUTS}")
    scale, zero = inp["quantization"]
    int8 = inp["dtype"] == np.int8

    def one(image: np.ndarray) -> list:
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

    def run(x: np.ndarray) -> Outputs:
        rows = [one(image) for image in x]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    name = f"{package} {package_version(package)}"
    return Runtime(name, run, 1, (float(scale), int(zero)) if int8 else None)


OPENERS = {".onnx": onnx_runtime, ".tflite": litert_runtime}


def open_runtime(path: Path, threads: int = 1) -> Runtime:
    """The runtime for ``path``'s format, with its thread count pinned."""
    try:
        opener = OPENERS[path.suffix]
    except KeyError:
        raise ValueError(f"no runtime for {path.name}: edgepc runs {sorted(OPENERS)}") from None
    return opener(path, threads)
