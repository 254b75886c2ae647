"""The perception-coherence loss: the student's soft ranks of dissimilarities against the teacher's.

    Ŝ = S / mean_{i≠j} S_ij                      (kept in the graph: scale-free, no radial grad)
    R̃_S(i, j) = 1/(B-2) Σ_{k∉{i,j}} σ((Ŝ_ij - Ŝ_ik) / τ)
    L_PC = mean_{i≠j} w_ij · ρ(R̃_S(i, j) - R_T(i, j))   ρ = square | abs

w_ij = 1 by default; with a neighbourhood width h, w_ij ∝ exp(-R_T(i, j) / h) (mean 1 over
i ≠ j): pairs the teacher ranks near count more, as the neighbourhoods kNN reads.

With a queue of M (``queue=M``), k runs over the other batch items and the M inputs seen
last (a queue of their student embeddings without gradient and their teacher embeddings), so
each rank is estimated on B - 2 + M inputs instead of B - 2; i and j stay in the batch.

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
    tau: float,
    penalty: str,
    teacher_ranks: str,
    neighbourhood: float | None = None,
    queue: int | None = None,
) -> None:
    if queue is not None and queue < 1:
        raise ValueError(f"queue must be >= 1 (or None), got {queue}")
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
    b, n = d.shape
    return (d.sum() - d.diagonal().sum()) / (b * (n - 1))


def normalise_by_mean(d: Tensor) -> Tensor:
    """``d`` (B×N) divided by its mean value off the entries (i, i) (in the graph; guarded
    against 0)."""
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
    """mean_{i≠j} w_ij ρ(R̃(a)_ij - target_ij), a = Ŝ/τ (B×N, (i, i) = sentinel), i, j < B,
    O(chunk·B·N) memory.

    The forward keeps only R̃ (B²); the backward recomputes the logistic terms chunk by chunk:
    ∂L/∂a_im = 1/(N-2) · ([m < B] g_im Σ_k w_imk - Σ_j g_ij w_ijm),  w = σ'(a_ij - a_ik),
    g = ∂L/∂R̃.
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
        b, n = a.shape
        ranks = torch.empty_like(target)
        for start in range(0, b, chunk_rows):
            rows = slice(start, min(start + chunk_rows, b))
            ranks[rows] = (soft_rank_terms(a, rows).sum(2) - 0.5) / (n - 2)
        values, slope = _penalty_and_slope(ranks - target, penalty)
        ctx.save_for_backward(a, slope * weights / (b * (b - 1)))
        ctx.chunk_rows = chunk_rows
        return (values * weights).sum() / (b * (b - 1))

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        a, g = ctx.saved_tensors
        b, n = a.shape
        grad = torch.empty_like(a)
        for start in range(0, b, ctx.chunk_rows):
            rows = slice(start, min(start + ctx.chunk_rows, b))
            w = soft_rank_terms(a, rows)
            w.addcmul_(w, w, value=-1.0)  # σ(1 - σ) in place
            g_rows = g[rows]
            grad[rows] = -torch.bmm(g_rows[:, None, :], w)[:, 0, :]
            grad[rows, :b] += g_rows * w.sum(2)
        return grad * (grad_out / (n - 2)), None, None, None, None


def teacher_ranks_of(t_dis: Tensor, tau: float, teacher_ranks: str) -> Tensor:
    """The teacher's target ranks of the batch pairs (B×B, no gradient) from ``t_dis`` (B×N):
    mid-ranks, or soft ranks of T / mean(T)."""
    with torch.no_grad():
        if teacher_ranks == "hard":
            return hard_ranks(t_dis)[:, : t_dis.shape[0]]
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
    """L_PC from a student (B×N, with grad) and teacher (B×N) dissimilarity matrix: rows are
    the batch, columns the batch then N - B references (N = B: none).

    Memory-bounded: peak extra memory O(B·N) in forward and backward (``chunk_rows`` anchors at
    a time; by default blocks of 2^22 elements on CPU, 2^26 on CUDA).
    """
    _check_options(tau, penalty, teacher_ranks, neighbourhood)
    b = check_dissimilarity_matrices(s_dis, t_dis)
    target = teacher_ranks_of(at_least_float32(t_dis), tau, teacher_ranks)
    a = scaled_with_sentinel(normalise_by_mean(at_least_float32(s_dis)), tau)
    weights = pair_weights(target, neighbourhood)
    return _SoftRankLoss.apply(
        a, target, weights, penalty, chunk_rows or default_chunk_rows(b, s_dis.device, a.shape[1])
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


Queued = tuple[Tensor, Tensor]  # M student embeddings (no gradient), their M teacher embeddings


def _feature_dissimilarities(
    student: Tensor, teacher: Tensor, dissimilarity: str, queued: Queued | None = None
) -> tuple[Tensor, Tensor]:
    """Student (with grad) and teacher dissimilarities of the batch to the batch, then to the
    queued inputs: B×(B+M)."""
    check_dissimilarity(dissimilarity)
    check_features(student, teacher)
    student, teacher = at_least_float32(student), at_least_float32(teacher.detach())
    s_cols = t_cols = None  # None: the batch against itself
    if queued is not None:
        check_features(*queued, min_batch=1)
        s_cols = torch.cat([student, queued[0].detach().to(student.dtype)])
        t_cols = torch.cat([teacher, queued[1].to(teacher.dtype)])
    with torch.no_grad():
        t_dis = pairwise_dissimilarity(teacher, t_cols, dissimilarity)
    s_dis = pairwise_dissimilarity(student, s_cols, dissimilarity)
    return s_dis, t_dis


def perception_coherence_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    dissimilarity: str = "euclidean",
    tau: float = 0.3,
    penalty: Penalty = "square",
    teacher_ranks: TeacherRanks = "soft",
    neighbourhood: float | None = None,
    queued: Queued | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """L_PC between student (B, d_S) and teacher (B, d_T) features; d_S and d_T may differ.
    ``queued``: M more inputs' student (M, d_S) and teacher (M, d_T) embeddings that every rank
    is also counted against.

    Class-unaware (no labels), memory-bounded, computed in float32 (float64 for float64 inputs)
    even under autocast.
    """
    with torch.autocast(student.device.type, enabled=False):
        s_dis, t_dis = _feature_dissimilarities(student, teacher, dissimilarity, queued)
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
    queued: Queued | None = None,
) -> Tensor:
    """Plain O(B²·N)-memory version of :func:`perception_coherence_loss` (tests, benchmarks)."""
    s_dis, t_dis = _feature_dissimilarities(student, teacher, dissimilarity, queued)
    return pc_loss_reference_from_dissimilarities(
        s_dis, t_dis, tau=tau, penalty=penalty, teacher_ranks=teacher_ranks,
        neighbourhood=neighbourhood,
    )  # fmt: skip


class PerceptionCoherenceLoss(nn.Module):
    """Module form of :func:`perception_coherence_loss` (``memory_bounded=False``: reference).

    ``queue=M`` keeps the last M inputs' embeddings (student detached, teacher) in a first-in
    first-out queue that each call ranks against and then pushes its batch into; the queue is
    a buffer of the module (saved with a training checkpoint), so it needs the two embedding
    sizes up front.
    """

    def __init__(
        self,
        dissimilarity: str = "euclidean",
        tau: float = 0.3,
        penalty: Penalty = "square",
        teacher_ranks: TeacherRanks = "soft",
        neighbourhood: float | None = None,
        queue: int | None = None,
        memory_bounded: bool = True,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_dissimilarity(dissimilarity)
        _check_options(tau, penalty, teacher_ranks, neighbourhood, queue)
        self.options = {
            "dissimilarity": dissimilarity,
            "tau": tau,
            "penalty": penalty,
            "teacher_ranks": teacher_ranks,
            "neighbourhood": neighbourhood,
        }
        self.memory_bounded = memory_bounded
        self.queue = queue
        if queue is not None:
            if student_dim is None or teacher_dim is None:
                raise ValueError("a queue needs student_dim and teacher_dim")
            self.register_buffer("queued_student", torch.zeros(queue, student_dim))
            self.register_buffer("queued_teacher", torch.zeros(queue, teacher_dim))
            self.register_buffer("queued", torch.zeros((), dtype=torch.long))  # pushed so far

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        queued = None
        if self.queue is not None and int(self.queued) > 0:
            filled = min(int(self.queued), self.queue)
            queued = (self.queued_student[:filled], self.queued_teacher[:filled])
        loss_fn = perception_coherence_loss if self.memory_bounded else (
            perception_coherence_loss_reference)  # fmt: skip
        loss = loss_fn(student, teacher, queued=queued, **self.options)
        if self.queue is not None:
            self._push(student.detach(), teacher.detach())
        return loss

    @torch.no_grad()
    def _push(self, student: Tensor, teacher: Tensor) -> None:
        """The batch into the queue, overwriting the oldest entries (slot = count mod M)."""
        keep = min(len(student), self.queue)
        slots = (int(self.queued) + torch.arange(keep, device=self.queued.device)) % self.queue
        self.queued_student[slots] = student[-keep:].to(self.queued_student)
        self.queued_teacher[slots] = teacher[-keep:].to(self.queued_teacher)
        self.queued += keep

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{opts}, queue={self.queue}, memory_bounded={self.memory_bounded}"
