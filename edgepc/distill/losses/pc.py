"""Nguyen et al., "Feature Representation Transferring to Lightweight Models via Perception
Coherence" (TMLR 2026): the perception-coherence loss, registered as ``pc``."""

from __future__ import annotations

from edgepc.coherence.loss import PerceptionCoherenceLoss
from edgepc.distill.losses.registry import register_loss


@register_loss("pc")
class PCLoss(PerceptionCoherenceLoss):
    """:class:`edgepc.coherence.PerceptionCoherenceLoss` under the registry's name ``pc``."""

    inputs = "features"
