"""The perception-coherence loss: the student's soft ranks of dissimilarities against the teacher's.

    Ŝ = S / mean_{i≠j} S_ij                      (kept in the graph: scale-free, no radial grad)
    R̃_S(i, j) = 1/(B-2) Σ_{k∉{i,j}} σ((Ŝ_ij - Ŝ_ik) / τ)
    L_PC = mean_{i≠j} w_ij · ρ(R̃_S(i, j) - R_T(i, j))   ρ = square | abs

w_ij = 1 by default; with a neighbourhood width h, w_ij ∝ exp(-R_T(i, j) / h) (mean 1 over
i ≠ j): pairs the teacher ranks near count more, as the neighbourhoods kNN reads.

R_T is the teacher's hard rank (mid-rank ties) or its soft rank with the same τ, never with
gradient. The normalisation, the logistic relaxation and ρ are edgepc's own formulation of
the paper's idea (README, "The formulation"), not the paper's verbatim loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from edgepc.coherence.dissimilarity import (
    check_dissimilarity,
    check_dissimilarity_matrices,
    check_features,
    pairwise_dissimilarity,
)
from edgepc.coherence.ranks import (
    default_chunk_rows,
    hard_ranks,
    hard_ranks_reference,
    scaled_with_sentinel,
    soft_rank_terms,
    soft_ranks,
    soft_ranks_reference,
)

Penalty = Literal["square", "abs"]
TeacherRanks = Literal["soft", "hard"]
PENALTIES = ("square", "abs")
TEACHER_RANKS = ("soft", "hard")


def _check_options(
    tau: float, penalty: str, teacher_ranks: str, neighbourhood: float | None = None
) -> None:
    if neighbourhood is not None and not neighbourhood > 0:
        raise ValueError(f"neighbourhood width must be > 0 (or None), got {neighbourhood}")
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}: choose one of {', '.join(PENALTIES)}")
    if teacher_ranks not in TEACHER_RANKS:
        raise ValueError(
            f"unknown teacher_ranks {teacher_ranks!r}: choose one of {', '.join(TEACHER_RANKS)}"
        )


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is: half precision is too coarse for ranks."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _off_diagonal_mean(d: Tensor) -> Tensor:
    b = d.shape[0]
    return (d.sum() - d.diagonal().sum()) / (b * (b - 1))


def normalise_by_mean(d: Tensor) -> Tensor:
    """``d`` divided by its mean off-diagonal value (in the graph; guarded against 0)."""
    return d / _off_diagonal_mean(d).clamp_min(torch.finfo(d.dtype).tiny)


def pair_weights(target: Tensor, neighbourhood: float | None) -> Tensor:
    """w_ij (B×B, 0 on the diagonal, mean 1 elsewhere): 1, or exp(-R_T(i, j) / h) rescaled."""
    b = target.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=target.device)
    if neighbourhood is None:
        return off.to(target.dtype)
    w = torch.exp(-target / neighbourhood) * off
    return w * (b * (b - 1) / w.sum())


def _penalty_and_slope(diff: Tensor, penalty: str) -> tuple[Tensor, Tensor]:
    if penalty == "square":
        return diff.square(), 2.0 * diff
    return diff.abs(), diff.sign()


class _SoftRankLoss(torch.autograd.Function):
    """mean_{i≠j} w_ij ρ(R̃(a)_ij - target_ij), a = Ŝ/τ (diagonal = sentinel), O(chunk·B²) memory.

    The forward keeps only R̃ (B²); the backward recomputes the logistic terms chunk by chunk:
    ∂L/∂a_im = 1/(B-2) · (g_im Σ_k w_imk - Σ_j g_ij w_ijm),  w = σ'(a_ij - a_ik), g = ∂L/∂R̃.
    """

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        a: Tensor,
        target: Tensor,
        weights: Tensor,
        penalty: str,
        chunk_rows: int,
    ) -> Tensor:
        b = a.shape[0]
        ranks = torch.empty_like(a)
        for start in range(0, b, chunk_rows):
            rows = slice(start, min(start + chunk_rows, b))
            ranks[rows] = (soft_rank_terms(a, rows).sum(2) - 0.5) / (b - 2)
        values, slope = _penalty_and_slope(ranks - target, penalty)
        ctx.save_for_backward(a, slope * weights / (b * (b - 1)))
        ctx.chunk_rows = chunk_rows
        return (values * weights).sum() / (b * (b - 1))

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        a, g = ctx.saved_tensors
        b = a.shape[0]
        grad = torch.empty_like(a)
        for start in range(0, b, ctx.chunk_rows):
            rows = slice(start, min(start + ctx.chunk_rows, b))
            w = soft_rank_terms(a, rows)
            w.addcmul_(w, w, value=-1.0)  # σ(1 - σ) in place
            g_rows = g[rows]
            grad[rows] = g_rows * w.sum(2) - torch.bmm(g_rows[:, None, :], w)[:, 0, :]
        return grad * (grad_out / (b - 2)), None, None, None, None


def teacher_ranks_of(t_dis: Tensor, tau: float, teacher_ranks: str) -> Tensor:
    """The teacher's target ranks (no gradient): mid-ranks, or soft ranks of T / mean(T)."""
    with torch.no_grad():
        if teacher_ranks == "hard":
            return hard_ranks(t_dis)
        return soft_ranks(normalise_by_mean(t_dis), tau)


def pc_loss_from_dissimilarities(
    s_dis: Tensor,
    t_dis: Tensor,
    *,
    tau: float = 0.3,
    penalty: Penalty = "square",
    teacher_ranks: TeacherRanks = "soft",
    neighbourhood: float | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """L_PC from a student (B×B, with grad) and teacher (B×B) dissimilarity matrix.

    Memory-bounded: peak extra memory O(B²) in forward and backward (``chunk_rows`` anchors at
    a time; by default blocks of 2^22 elements on CPU, 2^26 on CUDA).
    """
    _check_options(tau, penalty, teacher_ranks, neighbourhood)
    b = check_dissimilarity_matrices(s_dis, t_dis)
    target = teacher_ranks_of(at_least_float32(t_dis), tau, teacher_ranks)
    a = scaled_with_sentinel(normalise_by_mean(at_least_float32(s_dis)), tau)
    weights = pair_weights(target, neighbourhood)
    return _SoftRankLoss.apply(
        a, target, weights, penalty, chunk_rows or default_chunk_rows(b, s_dis.device)
    )


def pc_loss_reference_from_dissimilarities(
    s_dis: Tensor,
    t_dis: Tensor,
    *,
    tau: float = 0.3,
    penalty: Penalty = "square",
    teacher_ranks: TeacherRanks = "soft",
    neighbourhood: float | None = None,
) -> Tensor:
    """The same loss written plainly with B×B×B tensors and autograd: the tests' reference."""
    _check_options(tau, penalty, teacher_ranks, neighbourhood)
    b = check_dissimilarity_matrices(s_dis, t_dis)
    with torch.no_grad():
        t_dis = at_least_float32(t_dis)
        if teacher_ranks == "hard":
            target = hard_ranks_reference(t_dis)
        else:
            target = soft_ranks_reference(normalise_by_mean(t_dis), tau)
    ranks = soft_ranks_reference(normalise_by_mean(at_least_float32(s_dis)), tau)
    diff = ranks - target
    per_pair = diff.square() if penalty == "square" else diff.abs()
    off = ~torch.eye(b, dtype=torch.bool, device=s_dis.device)
    if neighbourhood is not None:  # written out again, not pair_weights: an independent check
        w = torch.exp(-target[off] / neighbourhood)
        return (per_pair[off] * w).sum() / w.sum()
    return per_pair[off].mean()


def _feature_dissimilarities(
    student: Tensor, teacher: Tensor, dissimilarity: str
) -> tuple[Tensor, Tensor]:
    check_dissimilarity(dissimilarity)
    check_features(student, teacher)
    with torch.no_grad():
        t_dis = pairwise_dissimilarity(at_least_float32(teacher.detach()), metric=dissimilarity)
    return pairwise_dissimilarity(at_least_float32(student), metric=dissimilarity), t_dis


def perception_coherence_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    dissimilarity: str = "euclidean",
    tau: float = 0.3,
    penalty: Penalty = "square",
    teacher_ranks: TeacherRanks = "soft",
    neighbourhood: float | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """L_PC between student (B, d_S) and teacher (B, d_T) features; d_S and d_T may differ.

    Class-unaware (no labels), memory-bounded, computed in float32 (float64 for float64 inputs)
    even under autocast.
    """
    with torch.autocast(student.device.type, enabled=False):
        s_dis, t_dis = _feature_dissimilarities(student, teacher, dissimilarity)
        return pc_loss_from_dissimilarities(
            s_dis,
            t_dis,
            tau=tau,
            penalty=penalty,
            teacher_ranks=teacher_ranks,
            neighbourhood=neighbourhood,
            chunk_rows=chunk_rows,
        )


def perception_coherence_loss_reference(
    student: Tensor,
    teacher: Tensor,
    *,
    dissimilarity: str = "euclidean",
    tau: float = 0.3,
    penalty: Penalty = "square",
    teacher_ranks: TeacherRanks = "soft",
    neighbourhood: float | None = None,
) -> Tensor:
    """Plain O(B³)-memory version of :func:`perception_coherence_loss` (tests, benchmarks)."""
    s_dis, t_dis = _feature_dissimilarities(student, teacher, dissimilarity)
    return pc_loss_reference_from_dissimilarities(
        s_dis, t_dis, tau=tau, penalty=penalty, teacher_ranks=teacher_ranks,
        neighbourhood=neighbourhood,
    )  # fmt: skip


class PerceptionCoherenceLoss(nn.Module):
    """Module form of :func:`perception_coherence_loss` (``memory_bounded=False``: reference)."""

    def __init__(
        self,
        dissimilarity: str = "euclidean",
        tau: float = 0.3,
        penalty: Penalty = "square",
        teacher_ranks: TeacherRanks = "soft",
        neighbourhood: float | None = None,
        memory_bounded: bool = True,
    ) -> None:
        super().__init__()
        check_dissimilarity(dissimilarity)
        _check_options(tau, penalty, teacher_ranks, neighbourhood)
        self.options = {
            "dissimilarity": dissimilarity,
            "tau": tau,
            "penalty": penalty,
            "teacher_ranks": teacher_ranks,
            "neighbourhood": neighbourhood,
        }
        self.memory_bounded = memory_bounded

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if self.memory_bounded:
            return perception_coherence_loss(student, teacher, **self.options)
        return perception_coherence_loss_reference(student, teacher, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{opts}, memory_bounded={self.memory_bounded}"
