"""Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from edgepc.distill.losses.registry import register_loss


def _normalised_gram(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    return F.normalize(flat @ flat.T, p=2, dim=1)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """‖G_S - G_T‖²_F / B² with G the row-L2-normalised Gram matrix of the batch."""
    b = student.shape[0]
    diff = _normalised_gram(student) - _normalised_gram(teacher.detach())
    return diff.square().sum() / (b * b)


@register_loss("sp")
class SPLoss(nn.Module):
    """Module form of :func:`sp_loss` (features may be vectors or feature maps)."""

    inputs = "features"

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return sp_loss(student, teacher)
