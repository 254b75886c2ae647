"""The typed errors a user can meet; each message says what is wrong and what to do."""


class EdgepcError(Exception):
    """Base of every user-facing edgepc error (the CLI prints it in one line, exit non-zero)."""


class DatasetError(EdgepcError):
    """A dataset is missing, unreadable or malformed."""


class ModelError(EdgepcError):
    """A model name, feature path or checkpoint is wrong."""


class TrainingError(EdgepcError):
    """Training cannot go on (a non-finite loss, an unusable checkpoint)."""


class QuantError(EdgepcError):
    """A model cannot be quantized for a target (an unsupported layer, a bad quant state)."""
