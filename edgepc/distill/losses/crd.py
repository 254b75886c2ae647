"""Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020): each image's
student and teacher embeddings (through small linear heads, L2-normalised) form the positive
pair of a noise-contrastive estimate; K negatives are the embeddings of other training images
kept in two memory banks (one per side, updated with momentum).

Feature-only: negatives are drawn uniformly from the other images of the training set. The
authors' CIFAR code draws them from other classes, a class signal this version does not read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepc.distill.losses.registry import register_loss


def crd_nce(scores: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """The NCE loss of ``scores`` (B, 1 + K): column 0 each anchor's positive, the others its K
    negatives, each a normalised exp(similarity / τ). Noise is uniform over ``n_data`` images:
    -(1/B) Σ_b [log P(D=1 | pos) + Σ_k log P(D=0 | neg_k)], P(D=1 | x) = x / (x + K / n_data)."""
    noise = (scores.shape[1] - 1) / n_data
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + eps))
    log_d0 = torch.log(noise / (negatives + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def other_indices(index: Tensor, k: int, n_data: int) -> Tensor:
    """(B, K) indices drawn uniformly from the ``n_data`` images other than each ``index``."""
    offsets = torch.randint(1, n_data, (len(index), k))
    return (index.cpu()[:, None] + offsets) % n_data


@register_loss("crd")
class CRDLoss(nn.Module):
    """CRD with the published defaults (128-d heads, K = 16384 negatives, τ = 0.07, memory
    momentum 0.5). ``forward`` needs each embedding's position in the training set (``index``)
    and updates the memory banks: one call per training step. The heads are trainable: give
    this module's parameters to the student's optimiser."""

    inputs = "features"

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int,
        feat_dim: int = 128,
        k: int = 16384,
        tau: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        if n_data < 2:
            raise ValueError(f"CRD needs at least 2 training images, got {n_data}")
        self.n_data, self.k, self.tau, self.momentum = n_data, k, tau, momentum
        self.embed_s = nn.Linear(student_dim, feat_dim)
        self.embed_t = nn.Linear(teacher_dim, feat_dim)
        # Random unit-scale rows, as the authors start their memory (stdv = 1/sqrt(d/3)).
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim) * 2 * bound - bound)
        # The normalising constants Z of each side, estimated on the first batch, then fixed.
        self.register_buffer("z", torch.full((2,), -1.0))

    def forward(self, student: Tensor, teacher: Tensor, index: Tensor) -> Tensor:
        v_s = F.normalize(self.embed_s(student), dim=1)
        v_t = F.normalize(self.embed_t(teacher.detach()), dim=1)
        others = other_indices(index, self.k, self.n_data)
        contrast = torch.cat([index.cpu()[:, None], others], 1).to(self.memory_s.device)
        index = index.to(self.memory_s.device)
        # Each anchor against the other side's memory: the positive (its own image) and the K
        # negatives, read as one (B, N) product then gathered (cheaper than (B, 1+K, d) when
        # K exceeds N, as it does on small training sets).
        out_s = torch.exp((v_s @ self.memory_t.T).gather(1, contrast) / self.tau)
        out_t = torch.exp((v_t @ self.memory_s.T).gather(1, contrast) / self.tau)
        if bool(self.z[0] < 0):
            self.z.copy_(torch.stack([out_s.mean(), out_t.mean()]).detach() * self.n_data)
        loss = crd_nce(out_s / self.z[0], self.n_data) + crd_nce(out_t / self.z[1], self.n_data)
        with torch.no_grad():  # out of place: backward still reads the memories used above
            for name, v in (("memory_s", v_s), ("memory_t", v_t)):
                memory = getattr(self, name)
                moved = memory[index] * self.momentum + v * (1 - self.momentum)
                setattr(self, name, memory.index_put((index,), F.normalize(moved, dim=1)))
        return loss
