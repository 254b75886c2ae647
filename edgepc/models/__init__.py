"""Teacher and student zoo; embeddings taken by module path with forward hooks."""

from edgepc.models.taps import EmbeddingModel, pool_to_vector, resolve_module
from edgepc.models.zoo import MODELS, build_model

__all__ = ["MODELS", "EmbeddingModel", "build_model", "pool_to_vector", "resolve_module"]
