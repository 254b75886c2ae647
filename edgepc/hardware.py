"""The one device picker: CUDA when present (or asked for), else CPU."""

from __future__ import annotations

import torch

from edgepc.errors import EdgepcError


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
