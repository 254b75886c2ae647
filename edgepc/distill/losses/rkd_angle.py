"""Park et al., "Relational Knowledge Distillation" (CVPR 2019): the angle-wise term."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from edgepc.distill.losses.registry import register_loss


def _angles(x: Tensor) -> Tensor:
    """cos ∠(e_i - e_j, e_k - e_j) for every triplet: a (B, B, B) tensor, as in the paper."""
    edges = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
    return (edges @ edges.transpose(1, 2)).flatten()


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber loss between the cosines of all triplet angles of student and teacher."""
    return F.smooth_l1_loss(_angles(student), _angles(teacher.detach()))


@register_loss("rkd_angle")
class RKDAngleLoss(nn.Module):
    """Module form of :func:`rkd_angle_loss` (O(B³) memory, like the original)."""

    inputs = "features"

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return rkd_angle_loss(student, teacher)
