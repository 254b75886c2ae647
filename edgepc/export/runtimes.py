"""The device runtimes (:mod:`edgepc_device.runtimes`) as the pipeline opens them: the same
code that runs on the device, with a missing runtime named by the extra that installs it."""

from __future__ import annotations

from pathlib import Path

from edgepc.export.writers import ExportError, missing
from edgepc_device.runtimes import MissingRuntimeError, Runtime
from edgepc_device.runtimes import open_runtime as open_on_device

EXTRAS = {"onnxruntime": "cpu", "ai-edge-litert": "mobile"}  # package -> pip extra


def open_runtime(path: Path, threads: int = 1) -> Runtime:
    """The runtime for ``path``'s format, with its thread count pinned."""
    try:
        return open_on_device(path, threads)
    except MissingRuntimeError as error:
        raise missing(error.package, EXTRAS[error.package]) from None
    except ValueError as error:  # no runtime for the format, or a file of the wrong shape
        raise ExportError(str(error)) from None
