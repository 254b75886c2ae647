"""Perception coherence (Nguyen et al., TMLR 2026): dissimilarities, ranks, metrics, the loss.

Pure tensor functions; this package imports only torch.
"""

from edgepc.coherence.dissimilarity import DISSIMILARITIES, pairwise_dissimilarity
from edgepc.coherence.loss import (
    PerceptionCoherenceLoss,
    pc_loss_from_dissimilarities,
    pc_loss_reference_from_dissimilarities,
    perception_coherence_loss,
    perception_coherence_loss_reference,
)
from edgepc.coherence.metrics import (
    CoherenceMetrics,
    coherence_metrics,
    coherence_metrics_from_dissimilarities,
)
from edgepc.coherence.ranks import hard_ranks, soft_ranks

__all__ = [
    "DISSIMILARITIES",
    "CoherenceMetrics",
    "PerceptionCoherenceLoss",
    "coherence_metrics",
    "coherence_metrics_from_dissimilarities",
    "hard_ranks",
    "pairwise_dissimilarity",
    "pc_loss_from_dissimilarities",
    "pc_loss_reference_from_dissimilarities",
    "perception_coherence_loss",
    "perception_coherence_loss_reference",
    "soft_ranks",
]
