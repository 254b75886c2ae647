"""Evaluation of a model's embeddings: top-1, kNN top-1 (class-unaware quality), pc_* metrics."""

from __future__ import annotations

import torch
from torch import Tensor

from edgepc.coherence import coherence_metrics
from edgepc.distill.images import Normalisation
from edgepc.models import EmbeddingModel


@torch.no_grad()
def predict(
    model: EmbeddingModel,
    images: Tensor,
    norm: Normalisation,
    device: torch.device,
    batch_size: int = 512,
) -> tuple[Tensor, Tensor]:
    """Logits and embeddings (float32, on the CPU) of uint8 ``images``, model in eval mode."""
    was_training = model.training
    model.eval()
    logits, embeddings = [], []
    for start in range(0, len(images), batch_size):
        x = norm.apply(images[start : start + batch_size].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out, emb = model(x)
        logits.append(out.float().cpu())
        embeddings.append(emb.float().cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(embeddings)


def top1(logits: Tensor, labels: Tensor) -> float:
    """Fraction of argmax predictions equal to the labels."""
    return (logits.argmax(1) == labels).double().mean().item()


def knn_top1(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, k: int = 5
) -> float:
    """Top-1 of a k-nearest-neighbour vote (cosine similarity, votes weighted by similarity)
    of ``queries`` among ``bank``: label-free quality of an embedding."""
    bank = torch.nn.functional.normalize(bank.float(), dim=1)
    n_classes = int(bank_labels.max()) + 1
    correct = 0
    for start in range(0, len(queries), 1024):
        q = torch.nn.functional.normalize(queries[start : start + 1024].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), n_classes).scatter_add_(1, bank_labels[idx], sims)
        correct += int((votes.argmax(1) == labels[start : start + 1024]).sum())
    return correct / len(queries)


def evaluate_embeddings(
    logits: Tensor,
    embeddings: Tensor,
    labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    teacher_embeddings: Tensor | None = None,
    pc_limit: int | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """top1, knn_top1 and, with the teacher's embeddings of the same images, pc_* metrics.

    ``pc_limit`` keeps the first n images for the O(N² log² N) pc_* metrics (None: all);
    ``device`` is where they are computed (a GPU is ~100× faster than 2 CPU cores).
    """
    result = {
        "top1": top1(logits, labels),
        "knn_top1": knn_top1(bank, bank_labels, embeddings, labels),
    }
    if teacher_embeddings is not None:
        n = len(embeddings) if pc_limit is None else min(pc_limit, len(embeddings))
        pair = (embeddings[:n].to(device), teacher_embeddings[:n].to(device))
        result |= coherence_metrics(*pair).as_dict()
    return result
