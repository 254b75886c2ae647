"""Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS 2022):
match inter- and intra-class Pearson relations of the softened predictions."""

from __future__ import annotations

from torch import Tensor, nn

from edgepc.distill.losses.registry import register_loss


def _pearson_distance(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """1 - Pearson correlation along the last dim, averaged over the rest."""
    xc = x - x.mean(-1, keepdim=True)
    yc = y - y.mean(-1, keepdim=True)
    corr = (xc * yc).sum(-1) / (xc.norm(dim=-1) * yc.norm(dim=-1) + eps)
    return (1.0 - corr).mean()


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
) -> Tensor:
    """T² · (β · inter-class relation loss + γ · intra-class relation loss) on softmax(z / T)."""
    p_s = (student_logits / temperature).softmax(dim=1)
    p_t = (teacher_logits.detach() / temperature).softmax(dim=1)
    inter = _pearson_distance(p_s, p_t)
    intra = _pearson_distance(p_s.T, p_t.T)
    return temperature**2 * (inter_weight * inter + intra_weight * intra)


@register_loss("dist")
class DISTLoss(nn.Module):
    """Module form of :func:`dist_loss`."""

    inputs = "logits"

    def __init__(
        self, temperature: float = 1.0, inter_weight: float = 1.0, intra_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.inter_weight = inter_weight
        self.intra_weight = intra_weight

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return dist_loss(
            student_logits,
            teacher_logits,
            self.temperature,
            self.inter_weight,
            self.intra_weight,
        )
