"""Park et al., "Relational Knowledge Distillation" (CVPR 2019): the distance-wise term."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from edgepc.coherence.dissimilarity import pairwise_dissimilarity
from edgepc.distill.losses.registry import register_loss


def _mean_normalised_distances(x: Tensor) -> Tensor:
    d = pairwise_dissimilarity(x, metric="euclidean")
    b = d.shape[0]
    return d / (d.sum() / (b * (b - 1)))


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber loss between pairwise distances, each normalised by its mean off-diagonal distance."""
    return F.smooth_l1_loss(
        _mean_normalised_distances(student), _mean_normalised_distances(teacher.detach())
    )


@register_loss("rkd_distance")
class RKDDistanceLoss(nn.Module):
    """Module form of :func:`rkd_distance_loss`."""

    inputs = "features"

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return rkd_distance_loss(student, teacher)
