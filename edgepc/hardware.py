"""The one device picker: CUDA when present (or asked for), else CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from edgepc.errors import EdgepcError
from edgepc_device.runtimes import cpu_flags


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: the first CUDA device if torch sees one, else the CPU; or exactly what is asked."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EdgepcError(f"device {preference!r} asked for, but torch sees no CUDA device")
    return device


def describe(device: torch.device) -> str:
    """A short human name of ``device`` for logs and MLflow tags."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()} threads"


def cpu_name() -> str:
    """The CPU's model name and logical core count, e.g. 'Intel(R) Xeon(R) Processor, 2 cores'."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX), by its flags: where bf16
    autocast speeds training up rather than emulating it."""
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags(cpuinfo) or set()))
