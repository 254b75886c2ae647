"""Top-1 and the ``pc_*`` coherence metrics of a student's embeddings against its teacher's, in
numpy: the definitions of edgepc.coherence.metrics (Euclidean dissimilarities, each anchor
against all others, ties as midranks), equal to them to 1e-12."""

from __future__ import annotations

import math

import numpy as np


def _distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances between all rows, float64, from inner products."""
    x = x.astype(np.float64)
    sq = (x * x).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0, None)
    return np.sqrt(d2)


def _drop_self(d: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    n = d.shape[1]
    keep = np.ones_like(d, dtype=bool)
    keep[np.arange(len(anchors)), anchors] = False
    return d[keep].reshape(len(anchors), n - 1)


def _run_starts(new_run: np.ndarray) -> np.ndarray:
    position = np.broadcast_to(np.arange(new_run.shape[1]), new_run.shape)
    return np.maximum.accumulate(np.where(new_run, position, 0), axis=1)


def _run_start_mask(*keys: np.ndarray) -> np.ndarray:
    new_run = np.zeros(keys[0].shape, dtype=bool)
    new_run[:, 0] = True
    for key in keys:
        new_run[:, 1:] |= key[:, 1:] != key[:, :-1]
    return new_run


def _midranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks per row, ties sharing the mean of their ranks."""
    n = x.shape[1]
    order = np.argsort(x, axis=1, kind="stable")
    new_run = _run_start_mask(np.take_along_axis(x, order, 1))
    first = _run_starts(new_run)
    run_end = np.ones_like(new_run)
    run_end[:, :-1] = new_run[:, 1:]
    last = n - 1 - _run_starts(run_end[:, ::-1])[:, ::-1]
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0, 1)
    return ranks


def _count_inversions(x: np.ndarray) -> np.ndarray:
    """Per row of non-negative integers, pairs p < q with x[p] > x[q]: a merge sort run on all
    rows at once (each merge is one searchsorted over segments offset to disjoint ranges)."""
    rows, n = x.shape
    size = 1 << max(0, (n - 1).bit_length())
    top = int(x.max()) + 1 if x.size else 1
    run = np.concatenate([x, np.full((rows, size - n), top, dtype=np.int64)], axis=1)
    inversions = np.zeros(rows, dtype=np.int64)
    width = 1
    while width < size:
        segments = size // (2 * width)
        pairs = run.reshape(rows, segments, 2, width)
        left, right = pairs[:, :, 0], pairs[:, :, 1]
        offset = (np.arange(rows * segments, dtype=np.int64) * (top + 1)).reshape(rows, segments, 1)
        base = (np.arange(rows * segments, dtype=np.int64) * width).reshape(rows, segments, 1)
        flat_left, flat_right = (left + offset).ravel(), (right + offset).ravel()
        left_upto_right = np.searchsorted(flat_left, flat_right, "right").reshape(
            right.shape) - base  # fmt: skip
        right_below_left = np.searchsorted(flat_right, flat_left, "left").reshape(
            left.shape) - base  # fmt: skip
        inversions += (width - left_upto_right).sum((1, 2))
        positions = np.arange(width)
        merged = np.empty((rows, segments, 2 * width), dtype=np.int64)
        np.put_along_axis(merged, positions + right_below_left, left, 2)
        np.put_along_axis(merged, positions + left_upto_right, right, 2)
        run = merged.reshape(rows, size)
        width *= 2
    return inversions


def _tied_pairs(new_run: np.ndarray) -> np.ndarray:
    position = np.broadcast_to(np.arange(new_run.shape[1]), new_run.shape)
    return (position - _run_starts(new_run)).sum(1)


def _agreeing_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, pairs with sign(a_j - a_k) = sign(b_j - b_k), ties included (Knight)."""
    by_b = np.argsort(b, axis=1, kind="stable")
    order = np.take_along_axis(
        by_b, np.argsort(np.take_along_axis(a, by_b, 1), axis=1, kind="stable"), 1
    )
    a_sorted, b_sorted = np.take_along_axis(a, order, 1), np.take_along_axis(b, order, 1)
    discordant = _count_inversions(b_sorted)
    tied_a = _tied_pairs(_run_start_mask(a_sorted))
    tied_b = _tied_pairs(_run_start_mask(np.take_along_axis(b, by_b, 1)))
    tied_both = _tied_pairs(_run_start_mask(a_sorted, b_sorted))
    n = a.shape[1]
    return n * (n - 1) // 2 - discordant - tied_a - tied_b + 2 * tied_both


def coherence_metrics(student: np.ndarray, teacher: np.ndarray, block: int = 256) -> dict:
    """pc_rank_gap, pc_triplet_agreement, pc_spearman of student vs teacher embeddings
    (Euclidean dissimilarities, each anchor against all others), as edgepc computes them."""
    n_total = len(student)
    s_dis, t_dis = _distances(student), _distances(teacher)
    gap_twice, agree, rhos = 0, 0, []
    for start in range(0, n_total, block):
        anchors = np.arange(start, min(start + block, n_total))
        s_rank = _midranks(_drop_self(s_dis[anchors], anchors))
        t_rank = _midranks(_drop_self(t_dis[anchors], anchors))
        s_int, t_int = (2 * s_rank).astype(np.int64), (2 * t_rank).astype(np.int64)
        gap_twice += int(np.abs(s_int - t_int).sum())
        agree += int(_agreeing_pairs(s_int, t_int).sum())
        sc = s_rank - s_rank.mean(1, keepdims=True)
        tc = t_rank - t_rank.mean(1, keepdims=True)
        norm = np.linalg.norm(sc, axis=1) * np.linalg.norm(tc, axis=1)
        defined = norm > 0
        rhos += ((sc * tc).sum(1)[defined] / norm[defined]).tolist()
    n = n_total - 1
    return {
        "pc_rank_gap": gap_twice / (2 * (n_total - 2) * n_total * n),
        "pc_triplet_agreement": agree / (n_total * (n * (n - 1) // 2)),
        "pc_spearman": math.fsum(rhos) / len(rhos) if rhos else float("nan"),
    }


def evaluate(
    logits: np.ndarray, embeddings: np.ndarray, labels: np.ndarray, teacher: np.ndarray
) -> dict:
    """top-1 on every image, pc_* on the images whose teacher embeddings the bundle carries."""
    n = len(teacher)
    result = {"top1": float((logits.argmax(1) == labels).mean()), "images": len(labels)}
    result.update(coherence_metrics(embeddings[:n], teacher))
    result["pc_images"] = n
    return result
