"""Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015): regress teacher features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from edgepc.distill.losses.registry import register_loss


def fitnet_loss(projected_student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between the student's projected features and the teacher's."""
    return F.mse_loss(projected_student, teacher)


@register_loss("fitnet")
class FitNetLoss(nn.Module):
    """FitNet hint loss with a learned linear projector d_S -> d_T (1×1 conv for (B, C, H, W)).

    The projector is trainable: give this module's parameters to the student's optimiser.
    """

    inputs = "features"

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.projector = nn.Linear(student_dim, teacher_dim)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        # Channels last so one Linear serves vectors and feature maps alike (a 1×1 conv).
        projected = self.projector(student.movedim(1, -1)).movedim(-1, 1)
        return fitnet_loss(projected, teacher)
