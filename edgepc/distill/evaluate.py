"""Evaluation of a model's embeddings: top-1, kNN top-1 (class-unaware quality), pc_* metrics."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from edgepc.coherence import coherence_metrics
from edgepc.data.images import Images, batches, chunks
from edgepc.distill.images import Normalisation


def predict_batches(
    model: nn.Module,
    images: Images,
    norm: Normalisation,
    device: torch.device,
    batch_size: int = 512,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Logits and embeddings (float32, on the CPU) of uint8 ``images``, batch by batch, model
    in eval mode (its mode is restored when the batches are all read)."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches(images, chunks(len(images), batch_size)):
            x = norm.apply(batch.to(device))
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
            ):
                out, emb = model(x)
            yield out.float().cpu(), emb.float().cpu()
    finally:
        model.train(was_training)


def predict(
    model: nn.Module,
    images: Images,
    norm: Normalisation,
    device: torch.device,
    batch_size: int = 512,
) -> tuple[Tensor, Tensor]:
    """Logits and embeddings (float32, on the CPU) of uint8 ``images``, model in eval mode."""
    logits, embeddings = zip(*predict_batches(model, images, norm, device, batch_size),
                             strict=True)  # fmt: skip
    return torch.cat(logits), torch.cat(embeddings)


def better_than_chance(accuracy: float, n: int, classes: int, z: float = 3.0) -> bool:
    """Whether ``accuracy`` on ``n`` images beats guessing among ``classes`` by more than ``z``
    binomial standard deviations (one-sided; 3: a guesser passes 0.1 % of the time)."""
    chance = 1.0 / classes
    return accuracy > chance + z * (chance * (1 - chance) / max(n, 1)) ** 0.5


def top1(logits: Tensor, labels: Tensor) -> float:
    """Fraction of argmax predictions equal to the labels."""
    return (logits.argmax(1) == labels).double().mean().item()


def knn_top1(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    labels: Tensor,
    k: int = 5,
    budget: int = 1 << 24,
) -> float:
    """Top-1 of a k-nearest-neighbour vote (cosine similarity, votes weighted by similarity)
    of ``queries`` among ``bank``: label-free quality of an embedding. Queries go in chunks
    whose similarity matrix holds at most ``budget`` values, and the bank is not copied, so
    memory beyond the bank does not grow with it."""
    bank = bank.float()
    inverse_norm = 1.0 / bank.norm(dim=1).clamp_min(1e-12)  # what F.normalize divides by
    n_classes = int(bank_labels.max()) + 1
    step = max(1, min(1024, budget // max(len(bank), 1)))
    correct = 0
    for start in range(0, len(queries), step):
        q = torch.nn.functional.normalize(queries[start : start + step].float(), dim=1)
        sims, idx = (q @ bank.T).mul_(inverse_norm).topk(k, dim=1)
        votes = torch.zeros(len(q), n_classes).scatter_add_(1, bank_labels[idx], sims)
        correct += int((votes.argmax(1) == labels[start : start + step]).sum())
    return correct / len(queries)


def linear_probe(
    bank: Tensor,
    bank_labels: Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    chunk: int = 4096,
) -> torch.nn.Linear:
    """A linear classifier fitted on frozen embeddings ``bank`` (standardised, full-batch
    L-BFGS on cross-entropy + ``weight_decay``·‖W‖², from zeros: deterministic); the
    standardisation is folded into the returned layer. Label-aware quality of an embedding
    that was learnt without labels. The bank is read ``chunk`` rows at a time (in float64),
    so memory beyond the bank does not grow with it."""
    n, dim = bank.shape
    parts = list(zip(bank.split(chunk), bank_labels.split(chunk), strict=True))
    mean = sum(x.double().sum(0) for x, _ in parts) / n
    std = (sum((x.double() - mean).square().sum(0) for x, _ in parts) / (n - 1)).sqrt()
    std = std.clamp_min(1e-6)
    n_classes = int(bank_labels.max()) + 1
    weight = torch.zeros(n_classes, dim, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:  # the full-batch loss, its gradient accumulated chunk by chunk
        optimizer.zero_grad()
        total = weight_decay * weight.square().sum()
        total.backward()
        for x, y in parts:
            z = (x.double() - mean) / std
            loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, y, reduction="sum") / n
            loss.backward()
            total = total.detach() + loss.detach()
        return total

    with torch.enable_grad():
        optimizer.step(closure)
    layer = torch.nn.Linear(dim, n_classes)
    with torch.no_grad():
        w = weight / std
        layer.weight.copy_(w)
        layer.bias.copy_(bias - w @ mean)
    return layer


def evaluate_embeddings(
    logits: Tensor,
    embeddings: Tensor,
    labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    teacher_embeddings: Tensor | None = None,
    pc_limit: int | None = None,
    device: torch.device | None = None,
    probe: torch.nn.Module | None = None,
) -> dict[str, float]:
    """top1, knn_top1, probe_top1 with a ``probe`` (see :func:`linear_probe`) and, with the
    teacher's embeddings of the same images, pc_* metrics.

    ``pc_limit`` keeps the first n images for the O(N² log² N) pc_* metrics (None: all);
    ``device`` is where they are computed (a GPU is ~100× faster than 2 CPU cores).
    """
    result = {
        "top1": top1(logits, labels),
        "knn_top1": knn_top1(bank, bank_labels, embeddings, labels),
    }
    if probe is not None:
        with torch.no_grad():
            result["probe_top1"] = top1(probe(embeddings.float()), labels)
    if teacher_embeddings is not None:
        n = len(embeddings) if pc_limit is None else min(pc_limit, len(embeddings))
        pair = (embeddings[:n].to(device), teacher_embeddings[:n].to(device))
        result |= coherence_metrics(*pair).as_dict()
    return result
