"""A bundle as the device reads it: the manifest, every file checked against its sha256, the
test set normalised as the student was trained."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
TESTSET = "testset.npz"
SCHEMA_VERSION = 1
INPUT = "images"  # the model's input, float32 NCHW
OUTPUTS = ("logits", "embedding")  # its outputs, in this order


class BundleError(Exception):
    """The bundle is missing, malformed, or does not match its manifest."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(folder: Path, files: list[dict]) -> None:
    """Every listed file (``{"path", "bytes", "sha256"}``) is a plain file of ``folder`` with its
    recorded size and sha256: a tampered or partly copied bundle is refused."""
    for entry in files:
        name = entry["path"]
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise BundleError(f"{MANIFEST} names {name!r}, not a plain file of the bundle")
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle {folder} is missing {name}")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise BundleError(
                f"{path} does not match its sha256 in {MANIFEST}: the bundle was changed or "
                "copied incompletely; copy it again"
            )


def read_bundle(folder: Path, target: str) -> dict:
    """The manifest of ``folder``, after checking that it is a ``target`` bundle whose files
    are all there, unchanged."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(f"{folder} has no {MANIFEST}: give the bundle folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{folder / MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{folder / MANIFEST} is not an edgepc bundle manifest (version 1)")
    if manifest.get("target") != target:
        raise BundleError(
            f"{folder} is a {manifest.get('target')!r} bundle; this script runs {target!r} ones"
        )
    names = [entry.get("path", "") for entry in manifest.get("files", [])]
    for needed in (manifest.get("model"), manifest.get("testset")):
        if needed not in names:
            raise BundleError(f"{MANIFEST} lists no file {needed!r}")
    verify_files(folder, manifest["files"])
    return manifest


def normalise(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std per channel, bit for bit what the
    student saw in training (edgepc.distill.images.Normalisation)."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - m) / s


def load_testset(folder: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised float32 images (N, C, H, W), labels, and the teacher's embeddings of the
    first images (for pc_* without the teacher)."""
    with np.load(folder / manifest["testset"]) as test:
        images, labels, teacher = test["images"], test["labels"], test["teacher_embeddings"]
    norm = manifest["normalisation"]
    return normalise(images, norm["mean"], norm["std"]), labels, teacher
