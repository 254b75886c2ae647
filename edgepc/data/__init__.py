"""Datasets by name (offline-capable), seeded splits, calibration subsets, fingerprints."""

from edgepc.data.datasets import ImageDataset, load_dataset, load_image_folder
from edgepc.data.splits import Splits, channel_stats, fingerprint, make_splits

__all__ = [
    "ImageDataset",
    "Splits",
    "channel_stats",
    "fingerprint",
    "load_dataset",
    "load_image_folder",
    "make_splits",
]
