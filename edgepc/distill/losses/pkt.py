"""Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer"
(ECCV 2018): match the conditional probability distributions of cosine similarities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepc.distill.losses.registry import register_loss


def _conditional_probabilities(x: Tensor, eps: float) -> Tensor:
    x = F.normalize(x, dim=1, eps=eps)
    kernel = (x @ x.T + 1.0) / 2.0
    return kernel / kernel.sum(1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """Mean over all (i, j) of p_t log((p_t + ε) / (p_s + ε)), p from the cosine kernel."""
    p_s = _conditional_probabilities(student, eps)
    p_t = _conditional_probabilities(teacher.detach(), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_loss("pkt")
class PKTLoss(nn.Module):
    """Module form of :func:`pkt_loss`."""

    inputs = "features"

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return pkt_loss(student, teacher, self.eps)
