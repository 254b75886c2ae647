"""Perception-coherence metrics over a whole evaluation set, computed in blocks of anchors.

All three depend only on the order of dissimilarities within each anchor's row, so they are
exactly invariant to any strictly increasing map applied to the student's or teacher's
dissimilarities. Memory is O(block · N); nothing N×N×N is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from edgepc.coherence.dissimilarity import (
    check_dissimilarity,
    check_dissimilarity_matrices,
    check_features,
    pairwise_dissimilarity,
)
from edgepc.coherence.ranks import drop_self, midranks, run_start_mask, run_starts


@dataclass(frozen=True)
class CoherenceMetrics:
    """``rank_gap`` (0 = coherent), ``triplet_agreement`` (1 = same orders), ``spearman``."""

    rank_gap: float
    triplet_agreement: float
    spearman: float

    def as_dict(self, prefix: str = "pc_") -> dict[str, float]:
        """Metric names as logged everywhere: pc_rank_gap, pc_triplet_agreement, pc_spearman."""
        return {
            f"{prefix}rank_gap": self.rank_gap,
            f"{prefix}triplet_agreement": self.triplet_agreement,
            f"{prefix}spearman": self.spearman,
        }


def count_inversions(x: Tensor) -> Tensor:
    """Per row, the number of pairs p < q with x[p] > x[q] (strict), by a vectorised merge sort.

    O(n log² n) per row; rows are merged in lock-step with searchsorted, no Python loop over n.
    """
    rows, n = x.shape
    size = 1 << max(0, (n - 1).bit_length())
    # Padding with the dtype's largest value sits after every real value: no inversion added.
    top = torch.finfo(x.dtype).max if x.is_floating_point() else torch.iinfo(x.dtype).max
    run = torch.cat([x, x.new_full((rows, size - n), top)], dim=1)
    inversions = torch.zeros(rows, dtype=torch.int64, device=x.device)
    width = 1
    while width < size:
        pairs = run.view(rows, size // (2 * width), 2, width)
        left, right = pairs[:, :, 0].contiguous(), pairs[:, :, 1].contiguous()
        left_upto_right = torch.searchsorted(left, right, side="right")
        inversions += (width - left_upto_right).sum((1, 2))
        right_below_left = torch.searchsorted(right, left, side="left")
        offsets = torch.arange(width, device=x.device)
        merged = torch.empty_like(run).view(rows, size // (2 * width), 2 * width)
        merged.scatter_(2, offsets + right_below_left, left)
        merged.scatter_(2, offsets + left_upto_right, right)
        run = merged.view(rows, size)
        width *= 2
    return inversions


def _tied_pairs(new_run: Tensor) -> Tensor:
    """Pairs inside runs of equal values, given a (rows, n) mask of where each run starts."""
    position = torch.arange(new_run.shape[1], device=new_run.device).expand_as(new_run)
    return (position - run_starts(new_run)).sum(1)


def agreeing_pairs(a: Tensor, b: Tensor) -> Tensor:
    """Per row, pairs (j, k) with sign(a_j - a_k) = sign(b_j - b_k), ties included (Knight).

    Sort by (a, b); discordant pairs are then the strict inversions of b. O(n log² n) a row.
    """
    by_b = b.argsort(dim=1, stable=True)
    order = by_b.gather(1, a.gather(1, by_b).argsort(dim=1, stable=True))
    a_sorted, b_sorted = a.gather(1, order), b.gather(1, order)
    discordant = count_inversions(b_sorted)
    tied_a = _tied_pairs(run_start_mask(a_sorted))
    tied_b = _tied_pairs(run_start_mask(b.gather(1, by_b)))
    tied_both = _tied_pairs(run_start_mask(a_sorted, b_sorted))
    n = a.shape[1]
    return n * (n - 1) // 2 - discordant - tied_a - tied_b + 2 * tied_both


def _pearson_rows(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise Pearson correlation, and a mask of rows where it is defined (non-constant)."""
    xc = x - x.mean(1, keepdim=True)
    yc = y - y.mean(1, keepdim=True)
    norm = xc.norm(dim=1) * yc.norm(dim=1)
    defined = norm > 0
    return (xc * yc).sum(1) / torch.where(defined, norm, 1.0), defined


DissimilarityRows = Callable[[Tensor], tuple[Tensor, Tensor]]


def _accumulate(rows_of: DissimilarityRows, n_total: int, block_rows: int) -> CoherenceMetrics:
    # Sums are exact (integers, fsum), so the result does not depend on the block size.
    gap_twice = 0  # Σ |2·midrank_S - 2·midrank_T|: integers
    agree = 0
    rhos: list[float] = []
    for start in range(0, n_total, block_rows):
        anchors = torch.arange(start, min(start + block_rows, n_total))
        s_rows, t_rows = rows_of(anchors)
        anchors = anchors.to(s_rows.device)
        s_rows, t_rows = drop_self(s_rows, anchors), drop_self(t_rows, anchors)
        s_rank, t_rank = midranks(s_rows), midranks(t_rows)
        # Doubled mid-ranks are exact integers with the same order: cheaper to sort and merge.
        s_int, t_int = (2 * s_rank).int(), (2 * t_rank).int()
        gap_twice += int((s_int - t_int).abs().sum())
        agree += int(agreeing_pairs(s_int, t_int).sum())
        rho, defined = _pearson_rows(s_rank, t_rank)
        rhos += rho[defined].tolist()
    n = n_total - 1
    return CoherenceMetrics(
        rank_gap=gap_twice / (2 * (n_total - 2) * n_total * n),
        triplet_agreement=agree / (n_total * (n * (n - 1) // 2)),
        spearman=math.fsum(rhos) / len(rhos) if rhos else float("nan"),
    )


def coherence_metrics_from_dissimilarities(
    s_dis: Tensor, t_dis: Tensor, block_rows: int = 256
) -> CoherenceMetrics:
    """pc_* metrics from full N×N student and teacher dissimilarity matrices (diagonal ignored)."""
    check_dissimilarity_matrices(s_dis, t_dis, square=True)
    return _accumulate(
        lambda rows: (s_dis[rows.to(s_dis.device)], t_dis[rows.to(t_dis.device)]),
        s_dis.shape[0],
        block_rows,
    )


def coherence_metrics(
    student: Tensor,
    teacher: Tensor,
    dissimilarity: str = "euclidean",
    block_rows: int = 256,
) -> CoherenceMetrics:
    """pc_* metrics of student (N, d_S) vs teacher (N, d_T) embeddings over the whole set.

    Dissimilarity rows are built per block of anchors in float64, so N = 10,000 needs only
    O(block · N) memory.
    """
    check_dissimilarity(dissimilarity)
    check_features(student, teacher)
    s64, t64 = student.detach().double(), teacher.detach().double()

    def rows_of(anchors: Tensor) -> tuple[Tensor, Tensor]:
        idx = anchors.to(s64.device)
        return (
            pairwise_dissimilarity(s64[idx], s64, dissimilarity),
            pairwise_dissimilarity(t64[idx], t64, dissimilarity),
        )

    return _accumulate(rows_of, student.shape[0], block_rows)
