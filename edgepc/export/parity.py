"""Does an exported file compute what the PyTorch model it came from computes?

Compared on the same normalised inputs: top-1 agreement, the largest logit difference (relative
to the reference's largest |logit|), and the pc_* metrics of the exported embeddings against
the PyTorch ones (1.0 triplet agreement: the same perception).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from edgepc.coherence import coherence_metrics


class Bounds(Protocol):
    top1_agreement: float  # at least
    max_logit_delta: float  # at most, relative to max |reference logit|
    pc_triplet_agreement: float  # at least


def parity(
    reference: tuple[np.ndarray, np.ndarray], exported: tuple[np.ndarray, np.ndarray]
) -> dict[str, float]:
    """Agreement of ``exported`` (logits, embeddings) with ``reference`` on the same inputs."""
    (ref_logits, ref_emb), (logits, emb) = reference, exported
    delta = float(np.abs(logits - ref_logits).max())
    pc = coherence_metrics(torch.from_numpy(emb).double(), torch.from_numpy(ref_emb).double())
    return {
        "top1_agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
        "max_logit_delta": delta / max(float(np.abs(ref_logits).max()), 1e-12),
        "max_logit_delta_abs": delta,
        **pc.as_dict(),
    }


def violations(row: dict[str, float], bounds: Bounds) -> list[str]:
    """What in ``row`` breaks ``bounds``, each as 'metric value < bound'."""
    broken = []
    for key in ("top1_agreement", "pc_triplet_agreement"):
        if not row[key] >= getattr(bounds, key):
            broken.append(f"{key} {row[key]:.4f} < {getattr(bounds, key)}")
    if not row["max_logit_delta"] <= bounds.max_logit_delta:
        broken.append(f"max_logit_delta {row['max_logit_delta']:.4g} > {bounds.max_logit_delta}")
    return broken


def parity_table(rows: dict[str, dict[str, float]], failures: dict[str, list[str]]) -> str:
    """Markdown: one line per exported file, its parity and what fails."""
    lines = [
        "| artifact | top-1 agreement | max Δlogit (rel.) | max Δlogit | triplet agreement | "
        "spearman | fails |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['top1_agreement']:.4f} | {row['max_logit_delta']:.3g} | "
            f"{row['max_logit_delta_abs']:.3g} | {row['pc_triplet_agreement']:.4f} | "
            f"{row['pc_spearman']:.4f} | {'; '.join(failures.get(name, [])) or '-'} |"
        )
    return "\n".join(lines) + "\n"
