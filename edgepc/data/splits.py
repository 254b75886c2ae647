"""Seeded train/val split (val carved from train; test untouched), calibration subset, and the
fingerprint that ties every run to the exact bytes it read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from edgepc.data.datasets import ImageDataset, stratified_subset
from edgepc.data.images import Images, batches, chunks


@dataclass(frozen=True)
class Splits:
    """Indices into the dataset's train part; the test part is used whole, never for tuning."""

    train: Tensor
    val: Tensor
    calibration: Tensor  # a subset of ``train``, for quantization


def make_splits(
    labels: Tensor,
    val_fraction: float = 0.1,
    calibration_size: int = 512,
    seed: int = 0,
    train_limit: int | None = None,
) -> Splits:
    """Stratified seeded split of the train labels: the same seed gives the same indices.

    ``train_limit`` keeps a stratified subset of the train part (quick profiles).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val = stratified_subset(labels, val_fraction, seed)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    train = torch.nonzero(keep).flatten()
    if train_limit is not None and train_limit < len(train):
        train = train[stratified_subset(labels[train], train_limit / len(train), seed + 1)]
    gen = torch.Generator().manual_seed(seed + 2)
    calibration = train[torch.randperm(len(train), generator=gen)[:calibration_size]].sort()
    return Splits(train=train, val=val, calibration=calibration.values)


def fingerprint(dataset: ImageDataset) -> str:
    """sha256 over the dataset's files (names and bytes, in a fixed order)."""
    digest = hashlib.sha256(dataset.name.encode())
    for path in sorted(dataset.files, key=lambda p: (p.parent.name, p.name)):
        digest.update(f"\0{path.parent.name}/{path.name}\0".encode())
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def channel_stats(images: Images) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1]; files are
    read batch by batch (sums in float64)."""
    if isinstance(images, Tensor):
        x = images.to(torch.float64).div_(255.0).transpose(0, 1).flatten(1)
        return x.mean(1).tolist(), x.std(1).tolist()
    count, total, squares = 0, torch.zeros(images.shape[1], dtype=torch.float64), 0.0
    for batch in batches(images, chunks(len(images), 256)):
        x = batch.to(torch.float64).div_(255.0).transpose(0, 1).flatten(1)
        count, total, squares = count + x.shape[1], total + x.sum(1), squares + (x * x).sum(1)
    mean = total / count
    return mean.tolist(), ((squares - count * mean**2) / (count - 1)).sqrt().tolist()
