"""A model by its spec, for teacher and student alike: a zoo name or ``torchvision:<arch>``
(any torchvision classification model, its embedding the input of its last linear layer),
optionally started from a local state dict.

One-channel data meets a three-channel torchvision model through its first convolution, its
RGB filters summed: exactly the network on the grayscale image repeated to RGB. A torchvision
student takes a small-image stem below ``SMALL_IMAGES`` px; a teacher keeps its standard one
(the weights it is brought with expect it).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from edgepc.errors import ModelError
from edgepc.models.taps import EmbeddingModel
from edgepc.models.zoo import MODELS, SMALL_IMAGES, build_model

TORCHVISION = "torchvision:"
Role = Literal["teacher", "student"]
OPTIONS: dict[str, str] = {"teacher": "teacher.model", "student": "distill.student"}


def load_state(path: Path, role: Role = "teacher") -> dict[str, Tensor]:
    """A state dict from ``path`` (tensors only: nothing in the file runs); a one-line
    :class:`ModelError` for a file that is missing, damaged or hostile."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        first = (str(error).splitlines() or [""])[0]
        raise ModelError(
            f"cannot load {role} checkpoint {path} ({type(error).__name__}: {first}): give a "
            f"state dict saved with torch.save(model.state_dict()) for {OPTIONS[role]}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(
            f"cannot load {role} checkpoint {path}: it holds a {type(state).__name__}, not a "
            "state dict: save it with torch.save(model.state_dict())"
        )
    return state


def _load_into(
    model: nn.Module, state: dict[str, Tensor], path: Path, spec: str, role: Role
) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{len(keys)} {what} (first {keys[0]!r})"
                    for keys, what in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                       (shapes, "tensors of another shape")) if keys]  # fmt: skip
        raise ModelError(
            f"cannot load {role} checkpoint {path}: its weights do not fit {spec}: "
            f"{', '.join(problems)}; give the state dict of that architecture"
        )
    model.load_state_dict(state)


def load_weights(model: nn.Module, path: Path, spec: str, role: Role = "teacher") -> None:
    """The state dict in ``path`` into ``model``; a mismatch names what does not fit."""
    _load_into(model, load_state(path, role), path, spec, role)


def _last_linear(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no linear layer to read logits from")
    return names[-1]


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _gray_stem(model: nn.Module) -> None:
    """The first convolution takes one channel: its RGB filters summed."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            gray = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, conv.groups, conv.bias is not None)  # fmt: skip
            with torch.no_grad():
                gray.weight.copy_(conv.weight.sum(1, keepdim=True))
                if conv.bias is not None:
                    gray.bias.copy_(conv.bias)
            _replace(model, name, gray)
            return
    raise ModelError(f"{type(model).__name__} has no 3-channel convolution to take 1 channel")


def small_image_stem(model: nn.Module) -> bool:
    """A stride-2 first convolution made stride 1 and a top-level ``maxpool`` made an identity
    (the weights unchanged); False where the stem is no stride-2 convolution (a patch embedding)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.stride != (2, 2):
        return False
    conv.stride = (1, 1)
    if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return True


def _check_runs(net: nn.Module, spec: str, in_channels: int, size: int, role: Role) -> None:
    """One image through ``net`` in eval mode: a one-line error where the size is too small."""
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, in_channels, size, size))
    except RuntimeError as error:
        first = (str(error).splitlines() or [""])[0][:160]
        raise ModelError(
            f"{spec} does not run on {size}-px images ({first}): pick another {OPTIONS[role]} "
            "or a larger data.image_size"
        ) from None
    finally:
        net.train()


def check_spec(spec: str, role: Role = "student") -> None:
    """A one-line :class:`ModelError`, with the closest names, unless ``spec`` names a zoo model
    or a torchvision classification architecture."""
    name, known, what = spec, list(MODELS), "model"
    if spec.startswith(TORCHVISION):
        from torchvision import models  # imported when used: it takes seconds

        name, what = spec.removeprefix(TORCHVISION), "torchvision architecture"
        known = models.list_models(module=models)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise ModelError(
        f"unknown {what} {name!r}{hint}: {OPTIONS[role]} takes a zoo name ({', '.join(MODELS)}) "
        f"or {TORCHVISION}<one of torchvision.models.list_models()>"
    )


def model_from_spec(
    spec: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    checkpoint: Path | None = None,
    role: Role = "student",
) -> tuple[EmbeddingModel, bool]:
    """The model ``spec`` names, from ``checkpoint`` when given (a torchvision head of another
    class count replaced), and whether it still has to be trained on the data."""
    check_spec(spec, role)
    if not spec.startswith(TORCHVISION):
        model = build_model(spec, num_classes, in_channels, image_size)
        if checkpoint is not None:
            load_weights(model.model, checkpoint, spec, role)
        return model, checkpoint is None
    from torchvision import models

    architecture = spec.removeprefix(TORCHVISION)
    head = _last_linear(models.get_model(architecture, num_classes=1))
    state = load_state(checkpoint, role) if checkpoint is not None else {}
    own_classes = state[f"{head}.weight"].shape[0] if f"{head}.weight" in state else num_classes
    net = models.get_model(architecture, weights=None, num_classes=own_classes)
    if checkpoint is not None:
        _load_into(net, state, checkpoint, spec, role)
    if own_classes != num_classes:
        _replace(net, head, nn.Linear(net.get_submodule(head).in_features, num_classes))
    if in_channels == 1:
        _gray_stem(net)
    if role == "student" and image_size < SMALL_IMAGES:
        small_image_stem(net)
    _check_runs(net, spec, in_channels, image_size, role)
    trained = checkpoint is not None and own_classes == num_classes
    return EmbeddingModel(net, head, at_input=True), not trained
