#!/usr/bin/env python3
"""Validate an edgepc ``mobile`` bundle with the LiteRT / TFLite interpreter (XNNPACK) on this
device: verify the bundle's sha256, run its whole test set image by image (int8 input quantized
and int8 outputs dequantized with the file's scales), pc_* against the teacher embeddings it
ships, time batch 1 per thread count, and write a report.

    python3 devices/mobile/validate.py BUNDLE [--threads 1 2] [--warmup 20] [--iterations 300]

Needs Python 3.8+, numpy and either ai-edge-litert or tflite-runtime.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common


def interpreter_class() -> tuple[type, str, str] | None:
    """(Interpreter, package, version) from ai_edge_litert, else tflite_runtime, else None."""
    from importlib.metadata import PackageNotFoundError, version

    for module, package in (("ai_edge_litert.interpreter", "ai-edge-litert"),
                            ("tflite_runtime.interpreter", "tflite-runtime")):  # fmt: skip
        try:
            found = __import__(module, fromlist=["Interpreter"]).Interpreter
        except ImportError:
            continue
        try:
            return found, package, version(package)
        except PackageNotFoundError:
            return found, package, "unknown"
    return None


def opener(model: Path, manifest: dict, threads: int) -> tuple[Callable, int | None]:
    interpreter = interpreter_class()[0](model_path=str(model), num_threads=threads)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    outs = sorted(interpreter.get_output_details(), key=lambda o: o["name"])  # output_0, _1
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

    return run, 1


def main(argv: list[str] | None = None) -> int:
    found = interpreter_class()
    if found is None:
        return common.fail(
            "no TFLite interpreter here: pip install numpy ai-edge-litert (or tflite-runtime)"
        )
    return common.validate("mobile", found[1], found[2], opener, argv)


if __name__ == "__main__":
    sys.exit(main())
