"""Images as the pipeline reads them: a uint8 ``(N, C, H, W)`` tensor in memory, or
:class:`FileImages`, image files decoded on demand (a folder larger than memory).

Both are indexed the same way (``images[index]``: a tensor's rows, or a lazy subset of the
files) and read through :func:`batches` (decoded in DataLoader worker processes for files) or
:func:`load` (into one tensor: for small parts only), so peak memory does not grow with the
number of files (benchmarks/results/stream_memory.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from edgepc.errors import DatasetError

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what PIL's convert("L") uses
Size = int | tuple[int, int]  # size × size, or (height, width)


def decode(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """One image file as uint8 RGB ``(3, H, W)``, resized to ``size`` (H, W) if given."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None and img.size[::-1] != tuple(size):
                img = img.resize(tuple(size)[::-1])
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None


@dataclass(frozen=True, eq=False)
class FileImages:
    """Image files read as RGB at ``size`` (H, W), then given ``channels`` (1: luma)."""

    files: tuple[Path, ...]
    size: tuple[int, int]
    channels: int = 3

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.channels, *self.size)

    def __getitem__(self, index: Tensor | slice | Sequence[int]) -> FileImages:
        """The files at ``index``, still unread."""
        if isinstance(index, slice):
            return replace(self, files=self.files[index])
        positions = index.tolist() if isinstance(index, Tensor) else list(index)
        return replace(self, files=tuple(self.files[i] for i in positions))

    def read(self) -> Tensor:
        """Every file, decoded in this process."""
        images = torch.from_numpy(np.stack([decode(path, self.size) for path in self.files]))
        return conform(images, None, self.channels)


def conform(images: Images, size: Size | None, channels: int | None, chunk: int = 2048) -> Images:
    """Images at ``size`` (bilinear, antialiased) with ``channels`` (grayscale repeated to RGB,
    RGB to luma); None keeps what they have. A tensor is converted ``chunk`` images at a time,
    so the float copy stays small; files are converted as they are read."""
    n, c, h, w = images.shape
    out_hw = (h, w) if size is None else (size, size) if isinstance(size, int) else tuple(size)
    out_c = channels or c
    if (out_hw, out_c) == ((h, w), c):
        return images
    if isinstance(images, FileImages):
        return replace(images, size=out_hw, channels=out_c)
    out = torch.empty((n, out_c, *out_hw), dtype=torch.uint8)
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    for start in range(0, n, chunk):
        x = images[start : start + chunk].float()
        if (h, w) != out_hw:
            x = F.interpolate(x, out_hw, mode="bilinear", antialias=True, align_corners=False)
        if out_c == 1 and c == 3:
            x = (x * luma).sum(1, keepdim=True)
        elif out_c == 3 and c == 1:
            x = x.expand(-1, 3, -1, -1)
        out[start : start + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


Images = Tensor | FileImages


class _Decoded(torch.utils.data.Dataset):
    """Item i: batch i of ``parts`` decoded (in a DataLoader worker)."""

    def __init__(self, images: FileImages, parts: Sequence[Tensor]) -> None:
        self.images, self.parts = images, parts

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[self.parts[i]].read()


def workers() -> int:
    """Decoding processes: ``$EDGEPC_WORKERS``, else the cores this process may use (≤ 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return int(os.environ.get("EDGEPC_WORKERS", min(8, cores or 1)))


def batches(images: Images, parts: Sequence[Tensor]) -> Iterator[Tensor]:
    """``images[part]`` as a uint8 tensor for each part, in order. Files are decoded by
    :func:`workers` processes a few batches ahead, so only those batches are in memory."""
    if isinstance(images, Tensor):
        yield from (images[part] for part in parts)
        return
    count = min(workers(), len(parts))
    loader = torch.utils.data.DataLoader(
        _Decoded(images, parts), batch_size=None, num_workers=count,
        prefetch_factor=2 if count else None, persistent_workers=False,
    )  # fmt: skip
    yield from loader


def chunks(n: int, size: int) -> list[Tensor]:
    """Positions 0 … n-1 in consecutive parts of ``size``."""
    return list(torch.arange(n).split(size))


def load(images: Images) -> Tensor:
    """All of ``images`` as one tensor (files decoded by the workers): for small parts only."""
    if isinstance(images, Tensor):
        return images
    parts = list(batches(images, chunks(len(images), 256)))
    return torch.cat(parts) if parts else torch.empty((0, *images.shape[1:]), dtype=torch.uint8)
