"""Features from an unmodified model, by module path, with a forward hook."""

from __future__ import annotations

import difflib

from torch import Tensor, nn

from edgepc.errors import ModelError

_LISTED = 60  # paths shown in an error before "…"


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at dotted ``path``; a DDP ``module.`` prefix is added or dropped as needed.

    A wrong path raises ModelError naming the closest valid paths and listing the others.
    """
    wrapped = isinstance(getattr(model, "module", None), nn.Module)
    candidates = [path]
    if wrapped and not path.startswith("module."):
        candidates.append(f"module.{path}")
    if not wrapped and path.startswith("module."):
        candidates.append(path.removeprefix("module."))
    names = [name for name, _ in model.named_modules() if name]
    for candidate in candidates:
        if candidate in names:
            return model.get_submodule(candidate)
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    shown = ", ".join(names[:_LISTED]) + (" …" if len(names) > _LISTED else "")
    raise ModelError(f"no module at path {path!r} in {type(model).__name__}{hint}; valid: {shown}")


def pool_to_vector(features: Tensor) -> Tensor:
    """(B, C, H, W) feature maps -> (B, C) by global average pooling; (B, ...) -> (B, -1)."""
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    return features.flatten(1)


class EmbeddingModel(nn.Module):
    """A model whose ``forward(x)`` returns ``(logits, embedding)``, the embedding read by a
    forward hook at ``embedding_path`` (pooled to a vector): the module's output, or with
    ``at_input`` its input (the features a classifier head reads). The model is not edited."""

    def __init__(self, model: nn.Module, embedding_path: str, at_input: bool = False) -> None:
        super().__init__()
        self.model = model
        self.embedding_path = embedding_path
        self._captured: Tensor | None = None
        module = resolve_module(model, embedding_path)
        if at_input:
            module.register_forward_pre_hook(self._capture_input)
        else:
            module.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._captured = output

    def _capture_input(self, module: nn.Module, inputs: tuple) -> None:
        self._captured = inputs[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        features, self._captured = self._captured, None
        if features is None:
            raise ModelError(
                f"module {self.embedding_path!r} did not run in the forward pass: "
                "choose a layer on the path from input to logits"
            )
        return logits, pool_to_vector(features)
