"""Pairwise dissimilarities between feature vectors, safe to differentiate everywhere."""

from __future__ import annotations

import torch
from torch import Tensor

DISSIMILARITIES = ("euclidean", "sqeuclidean", "cosine")


def check_dissimilarity(name: str) -> str:
    """Return ``name`` if it is a known dissimilarity, else raise a ValueError listing them."""
    if name not in DISSIMILARITIES:
        raise ValueError(
            f"unknown dissimilarity {name!r}: choose one of {', '.join(DISSIMILARITIES)}"
        )
    return name


def check_features(*features: Tensor, min_batch: int = 3) -> None:
    """Raise a ValueError unless all feature batches are finite 2-D tensors of one batch size."""
    sizes = set()
    for x in features:
        if x.ndim != 2:
            raise ValueError(f"features must be 2-D (batch, dim), got shape {tuple(x.shape)}")
        sizes.add(x.shape[0])
    if len(sizes) > 1:
        raise ValueError(f"mismatched batch sizes {sorted(sizes)}: every input needs one row each")
    batch = sizes.pop()
    if batch < min_batch:
        raise ValueError(f"batch size {batch} < {min_batch}: ranking needs at least 3 inputs")
    for x in features:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("features contain NaN or Inf: check the model's output and the loss")


def check_dissimilarity_matrices(student: Tensor, teacher: Tensor, square: bool = False) -> int:
    """Raise a ValueError unless both are finite B×N matrices of one shape, B >= 3 and N >= B
    (the batch's columns first, then any references; ``square``: N = B); return B."""
    if student.shape != teacher.shape or student.ndim != 2 or student.shape[0] > student.shape[1]:
        raise ValueError(
            "dissimilarities must be two B×N matrices of one shape with N >= B (the batch, then "
            f"any references), got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if square and student.shape[0] != student.shape[1]:
        raise ValueError(f"dissimilarities must be square N×N matrices, got {tuple(student.shape)}")
    if student.shape[0] < 3:
        raise ValueError(f"batch size {student.shape[0]} < 3: ranking needs at least 3 inputs")
    if not (bool(torch.isfinite(student).all()) and bool(torch.isfinite(teacher).all())):
        raise ValueError("dissimilarities contain NaN or Inf: check the features they came from")
    return student.shape[0]


def pairwise_dissimilarity(x: Tensor, y: Tensor | None = None, metric: str = "euclidean") -> Tensor:
    """Dissimilarities between every row of ``x`` (n, d) and every row of ``y`` (m, d) -> (n, m).

    Built from inner products so memory stays O(n·m); the square root has a zero gradient at
    zero distance (duplicate points), never NaN.
    """
    check_dissimilarity(metric)
    y = x if y is None else y
    if metric == "cosine":
        xn = torch.nn.functional.normalize(x, dim=1)
        yn = xn if y is x else torch.nn.functional.normalize(y, dim=1)
        return (1.0 - xn @ yn.T).clamp(0.0, 2.0)
    x2 = (x * x).sum(1, keepdim=True)
    y2 = x2 if y is x else (y * y).sum(1, keepdim=True)
    sq = (x2 + y2.T - 2.0 * (x @ y.T)).clamp_min(0.0)
    if metric == "sqeuclidean":
        return sq
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)
