"""uint8 image batches to normalised float tensors, and the light augmentation for training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and std of images scaled to [0, 1] (what the exported model expects)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std, on the images' device."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flip and a random shift of up to 2 px (zero padding), per image, as a
    few batched tensor ops on the images' device (the draws come from ``generator``, on the
    CPU, so a batch is augmented the same on every device)."""
    b, c, h, w = images.shape
    flip = torch.rand(b, generator=generator) < 0.5
    dy, dx = torch.randint(0, 5, (2, b), generator=generator).to(images.device)
    out = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    padded = torch.nn.functional.pad(out, (2, 2, 2, 2))
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]
