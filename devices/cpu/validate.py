#!/usr/bin/env python3
"""Validate an edgepc ``cpu`` bundle with onnxruntime on this machine: verify the bundle's
sha256, run its whole test set, pc_* against the teacher embeddings it ships, time batch 1 per
thread count, and write a report (``--out``, default ./report-<bundle>-<host>.json).

    python3 devices/cpu/validate.py BUNDLE [--threads 1 2] [--warmup 20] [--iterations 300]

Needs Python 3.8+, numpy and onnxruntime only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common


def opener(model: Path, manifest: dict, threads: int) -> tuple[Callable, int | None]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if common.x86_without_vnni():  # exact int8 kernels where the fast ones saturate
        options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    names = [o["name"] for o in manifest["outputs"]]

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = session.run(names, {feed: x})
        return logits, embedding

    return run, None


def main(argv: list[str] | None = None) -> int:
    try:
        import onnxruntime
    except ImportError:
        return common.fail("onnxruntime is not installed here: pip install numpy onnxruntime")
    exact = " (exact int8: no VNNI)" if common.x86_without_vnni() else ""
    return common.validate("cpu", "onnxruntime", onnxruntime.__version__ + exact, opener, argv)


if __name__ == "__main__":
    sys.exit(main())
