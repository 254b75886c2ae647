"""Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015): soft logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from edgepc.distill.losses.registry import register_loss


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


@register_loss("kd")
class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`."""

    inputs = "logits"

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature)
