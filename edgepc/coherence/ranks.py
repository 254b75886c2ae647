"""Normalised ranks of dissimilarities: the batch estimate of a model's perception.

For an anchor row i of a dissimilarity matrix D (n × N, row i's own column excluded), the
rank of j is R(i, j) = 1/(N-2) · Σ_{k ∉ {i, j}} H(D_ij - D_ik) with H the Heaviside step
(½ at 0, i.e. mid-ranks for ties). The soft rank replaces H by a logistic of temperature τ.

The soft ranks take a B×N matrix whose first B columns are the batch itself (anchor i is column
i) and whose N - B further columns are reference inputs: the rank of a batch pair (i, j) is
then counted against every other batch item and every reference (N = B: the batch alone).
"""

from __future__ import annotations

import torch
from torch import Tensor

# A logistic of argument <= -200 is exactly 0 in float32/float64 and so is its derivative:
# writing this margin on the diagonal removes k = i from the soft-rank sums without a mask.
_SENTINEL_MARGIN = 200.0


def _other_columns(d: Tensor, anchors: Tensor) -> Tensor:
    """Index (n, N-1) of every column of row r except its own, ``anchors[r]``."""
    cols = torch.arange(d.shape[1] - 1, device=d.device).expand(d.shape[0], -1)
    return cols + (cols >= anchors[:, None])


def drop_self(d: Tensor, anchors: Tensor) -> Tensor:
    """Rows of ``d`` (n, N) without each row's own column ``anchors[r]`` -> (n, N-1)."""
    return d.gather(1, _other_columns(d, anchors))


def run_start_mask(*sorted_keys: Tensor) -> Tensor:
    """(rows, n) mask of where a new run of equal values begins in rows sorted by the keys."""
    new_run = torch.zeros_like(sorted_keys[0], dtype=torch.bool)
    new_run[:, 0] = True
    for key in sorted_keys:
        new_run[:, 1:] |= key[:, 1:] != key[:, :-1]
    return new_run


def run_starts(new_run: Tensor) -> Tensor:
    """The position where the run of each element begins, from :func:`run_start_mask`."""
    position = torch.arange(new_run.shape[-1], device=new_run.device).expand_as(new_run)
    return torch.where(new_run, position, 0).cummax(dim=-1).values


def midranks(x: Tensor) -> Tensor:
    """0-based ranks along the last dim of a 2-D tensor, ties sharing the mean of their ranks.

    One sort, then each run of equal values gets (first + last position) / 2: O(n log n).
    """
    n = x.shape[-1]
    ordered, order = x.sort(dim=-1)
    new_run = run_start_mask(ordered)
    first = run_starts(new_run)
    # The last position of a run, read from the right: run starts of the reversed sequence.
    run_end = torch.ones_like(new_run)
    run_end[:, :-1] = new_run[:, 1:]
    last = n - 1 - run_starts(run_end.flip(-1)).flip(-1)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return torch.empty_like(x, dtype=dtype).scatter_(-1, order, (first + last).to(dtype) / 2)


def hard_ranks(d: Tensor, anchors: Tensor | None = None) -> Tensor:
    """Normalised mid-ranks R̂(i, j) in [0, 1] of each row of ``d``; each row's own entry is 0.

    ``d`` is (n, N): row r holds the dissimilarities of anchor ``anchors[r]`` to all N inputs
    (default: the square case, anchor r is column r). O(n·N log N) by sorting.
    """
    anchors = torch.arange(d.shape[0], device=d.device) if anchors is None else anchors
    others = _other_columns(d, anchors)
    ranks = midranks(d.gather(1, others)) / (d.shape[1] - 2)
    return torch.zeros_like(d, dtype=ranks.dtype).scatter_(1, others, ranks)


def scaled_with_sentinel(d: Tensor, tau: float) -> Tensor:
    """``d / τ`` (B×N) with each anchor's own entry (i, i) raised so far that no soft rank
    counts k = i."""
    scaled = d / tau
    sentinel = scaled.detach().max() + _SENTINEL_MARGIN
    eye = torch.eye(*d.shape, dtype=torch.bool, device=d.device)
    return scaled.masked_fill(eye, sentinel)


def soft_rank_terms(a: Tensor, rows: slice) -> Tensor:
    """σ(a_ij - a_ik) for anchors i in ``rows``, batch items j < B and every column k of the
    B×N matrix ``a``: a (len(rows), B, N) block, k = i terms 0."""
    block = a[rows]
    return torch.sigmoid_(block[:, : a.shape[0], None] - block[:, None, :])


@torch.no_grad()
def soft_ranks(d: Tensor, tau: float, chunk_rows: int | None = None) -> Tensor:
    """Soft ranks R̃(i, j) (B×B) of the batch pairs of ``d`` (B×N, N ≥ B: the batch, then any
    references); the diagonal is ignored and returned as 0.

    Memory O(chunk_rows · B·N): anchors are processed in chunks. It carries no gradient
    (teacher side); the student side goes through the loss's custom backward.
    """
    b, n = d.shape
    a = scaled_with_sentinel(d, tau)
    step = chunk_rows or default_chunk_rows(b, d.device, n)
    out = torch.empty((b, b), dtype=a.dtype, device=a.device)
    for start in range(0, b, step):
        rows = slice(start, min(start + step, b))
        # Σ_{k≠i} includes k = j, which contributes σ(0) = ½: subtract it.
        out[rows] = (soft_rank_terms(a, rows).sum(2) - 0.5) / (n - 2)
    return out.fill_diagonal_(0.0)


def soft_ranks_reference(d: Tensor, tau: float) -> Tensor:
    """Soft ranks written plainly with a B×B×N tensor and autograd: for tests and benchmarks.

    Sums σ over every k, then takes out the k = i term and the k = j term (σ(0) = ½).
    """
    b, n = d.shape
    batch = d[:, :b]
    every_k = torch.sigmoid((batch[:, :, None] - d[:, None, :]) / tau).sum(2)
    k_is_i = torch.sigmoid((batch - d.diagonal()[:, None]) / tau)
    off = ~torch.eye(b, dtype=torch.bool, device=d.device)
    return (every_k - k_is_i - 0.5) * off / (n - 2)


def hard_ranks_reference(d: Tensor) -> Tensor:
    """Hard ranks of the batch pairs of ``d`` (B×N) by the definition (Heaviside, ½ at ties):
    O(B²·N) memory, for tests only."""
    b, n = d.shape
    i = torch.arange(b, device=d.device)[:, None, None]
    j = torch.arange(b, device=d.device)[None, :, None]
    k = torch.arange(n, device=d.device)[None, None, :]
    keep = (k != i) & (k != j) & (j != i)
    diff = d[:, :b, None] - d[:, None, :]
    step = (diff > 0).to(d.dtype) + 0.5 * (diff == 0).to(d.dtype)
    return (step * keep).sum(2) / (n - 2)


# Elements of one (chunk, B, B) block. CPU: 16 MiB blocks ran fastest on 2 cores (cache);
# CUDA: 256 MiB blocks keep kernel launches few while memory stays O(B²).
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def default_chunk_rows(batch: int, device: torch.device, columns: int | None = None) -> int:
    """Anchors per chunk so that one (chunk, B, N) block holds about CHUNK_ELEMENTS[device]
    (N = ``columns``, default B)."""
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])
    return max(1, budget // (batch * (columns or batch)))
