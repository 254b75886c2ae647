"""One registry of distillation losses, found by name (``@register_loss("pkt")``)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Literal, TypeVar

from torch import nn

LossInputs = Literal["features", "logits"]
_LOSSES: dict[str, type[nn.Module]] = {}
M = TypeVar("M", bound=type[nn.Module])


def register_loss(name: str) -> Callable[[M], M]:
    """Class decorator: make a loss module buildable as ``build_loss(name, ...)``.

    The class says what it compares with a class attribute ``inputs``: "features" (embeddings,
    shape (B, d)) or "logits".
    """

    def add(cls: M) -> M:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        if getattr(cls, "inputs", None) not in ("features", "logits"):
            raise ValueError(f"loss {name!r} must set inputs = 'features' or 'logits'")
        _LOSSES[name] = cls
        return cls

    return add


def loss_names() -> list[str]:
    """Names of every registered loss, sorted."""
    return sorted(_LOSSES)


def loss_class(name: str) -> type[nn.Module]:
    """The registered class for ``name``; a ValueError naming the closest valid name if unknown."""
    if name not in _LOSSES:
        close = difflib.get_close_matches(name, _LOSSES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown loss {name!r}{hint}: registered are {', '.join(loss_names())}")
    return _LOSSES[name]


def build_loss(name: str, **options: object) -> nn.Module:
    """Instantiate the loss registered as ``name`` with its keyword options."""
    return loss_class(name)(**options)
