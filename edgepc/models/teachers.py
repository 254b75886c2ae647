"""The teacher a user brings, by ``teacher.model``:

- a zoo name (``resnet18``, ``efficientnet_lite0`` ...), trained here or loaded from
  ``teacher.checkpoint``;
- ``torchvision:<architecture>``, any torchvision classification model, with
  ``teacher.checkpoint`` a local state dict of it; when its head has another class count than
  the data, the head is replaced and the whole model fine-tuned (``teacher.train``); the
  embedding is the input of its last linear layer;
- a ``torch.export`` program file (``*.pt2``) whose outputs are ``(logits, embedding)``, used
  as it is (exported in eval mode, never trained), with a dynamic batch dimension.

One-channel data meets a three-channel torchvision teacher through its first convolution, its
RGB filters summed: exactly the network on the grayscale image repeated to RGB.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from edgepc.errors import ModelError
from edgepc.files import atomic_path
from edgepc.models.taps import EmbeddingModel, pool_to_vector
from edgepc.models.zoo import build_model

TORCHVISION = "torchvision:"
PROGRAM = ".pt2"


def load_state(path: Path) -> dict[str, Tensor]:
    """A state dict from ``path`` (tensors only: nothing in the file runs); a one-line
    :class:`ModelError` for a file that is missing, damaged or hostile."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        first = (str(error).splitlines() or [""])[0]
        raise ModelError(
            f"cannot load teacher checkpoint {path} ({type(error).__name__}: {first}): give a "
            "state dict saved with torch.save(model.state_dict()) for teacher.model"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(
            f"cannot load teacher checkpoint {path}: it holds a {type(state).__name__}, not a "
            "state dict: save it with torch.save(model.state_dict())"
        )
    return state


def load_weights(model: nn.Module, path: Path, spec: str) -> None:
    """The state dict in ``path`` into ``model``; a mismatch names what does not fit."""
    state = load_state(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{len(keys)} {what} (first {keys[0]!r})"
                    for keys, what in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                       (shapes, "tensors of another shape")) if keys]  # fmt: skip
        raise ModelError(
            f"cannot load teacher checkpoint {path}: its weights do not fit {spec}: "
            f"{', '.join(problems)}; give the state dict of that architecture"
        )
    model.load_state_dict(state)


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


def torchvision_teacher(
    architecture: str, num_classes: int, in_channels: int, checkpoint: Path | None = None
) -> tuple[EmbeddingModel, bool]:
    """torchvision's ``architecture`` for ``num_classes`` and ``in_channels`` (its head replaced
    when the checkpoint's has another class count), and whether it still has to be trained."""
    from torchvision import models

    known = models.list_models(module=models)
    if architecture not in known:
        close = difflib.get_close_matches(architecture, known, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ModelError(
            f"unknown torchvision architecture {architecture!r}{hint}: teacher.model takes "
            f"{TORCHVISION}<one of torchvision.models.list_models()>"
        )
    spec = f"{TORCHVISION}{architecture}"
    head = _last_linear(models.get_model(architecture, num_classes=1))
    state = load_state(checkpoint) if checkpoint else None
    own_classes = num_classes
    if state is not None and f"{head}.weight" in state:
        own_classes = state[f"{head}.weight"].shape[0]
    model = models.get_model(architecture, weights=None, num_classes=own_classes)
    if checkpoint is not None:
        load_weights(model, checkpoint, spec)
    if own_classes != num_classes:
        linear = model.get_submodule(head)
        _replace(model, head, nn.Linear(linear.in_features, num_classes))
    if in_channels == 1:
        _gray_stem(model)
    trained = checkpoint is not None and own_classes == num_classes
    return EmbeddingModel(model, head, at_input=True), not trained


class ProgramTeacher(nn.Module):
    """A ``torch.export`` program as a teacher: forward gives its (logits, embedding), the
    embedding pooled to a vector. It runs as exported; ``train()`` and ``eval()`` do not reach
    it (an exported program cannot switch modes)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        try:
            program = torch.export.load(path)
        except Exception as error:
            raise ModelError(
                f"cannot load the exported program {path} ({type(error).__name__}): give a "
                "file written by torch.export.save(torch.export.export(model, ...), path)"
            ) from None
        self.program = program.module()
        for parameter in self.program.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> ProgramTeacher:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.program(x)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            got = f"{len(out)} outputs" if isinstance(out, tuple | list) else "one tensor"
            raise ModelError(
                f"the exported program {self.path} gives {got}; a teacher program returns "
                "(logits, embedding): export a module whose forward does"
            )
        logits, embedding = out
        return logits, pool_to_vector(embedding)

    def check(self, example: Tensor, num_classes: int) -> None:
        """Run 2, then all of ``example`` (normalised images, 3 or more): one line on what
        does not fit."""
        for n in (2, len(example)):
            try:
                logits, embedding = self(example[:n])
            except ModelError:
                raise
            except Exception as error:
                first = (str(error).splitlines() or [""])[0]
                raise ModelError(
                    f"the exported program {self.path} does not run on a batch of {n} images of "
                    f"shape {list(example.shape[1:])} ({type(error).__name__}: {first[:160]}): "
                    "export it for that shape, with a dynamic batch: "
                    "dynamic_shapes=({0: Dim('batch')},)"
                ) from None
            if logits.shape != (n, num_classes):
                raise ModelError(
                    f"the exported program {self.path} gives logits of shape "
                    f"{list(logits.shape)} for {n} images; the data has {num_classes} classes: "
                    "export it with that head"
                )
            if embedding.shape[0] != n:
                raise ModelError(f"the exported program {self.path} gives no embedding per image")


Teacher = EmbeddingModel | ProgramTeacher  # forward(x) gives (logits, embedding)


def is_program(spec: str) -> bool:
    return spec.endswith(PROGRAM)


def teacher_model(
    spec: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    checkpoint: Path | None = None,
) -> tuple[Teacher, bool]:
    """The teacher ``spec`` names, loaded from ``checkpoint`` (or the program file), and
    whether it still has to be trained on the data."""
    if is_program(spec):
        return ProgramTeacher(Path(spec)), False
    if spec.startswith(TORCHVISION):
        return torchvision_teacher(spec.removeprefix(TORCHVISION), num_classes, in_channels,
                                   checkpoint)  # fmt: skip
    model = build_model(spec, num_classes, in_channels, image_size)
    if checkpoint is not None:
        load_weights(model.model, checkpoint, spec)
    return model, checkpoint is None


def save_teacher(teacher: Teacher, folder: Path) -> str:
    """The teacher's weights (a state dict) or its program, into ``folder``: the file name."""
    name = f"teacher{PROGRAM}" if isinstance(teacher, ProgramTeacher) else "teacher.pt"
    with atomic_path(folder / name) as temporary:
        if isinstance(teacher, ProgramTeacher):
            shutil.copyfile(teacher.path, temporary)
        else:
            torch.save(teacher.model.state_dict(), temporary)
    return name


def reload_teacher(
    spec: str, file: Path, num_classes: int, in_channels: int, image_size: int
) -> Teacher:
    """The teacher a teacher stage saved in ``file``, for a later stage."""
    if is_program(spec):
        return ProgramTeacher(file)
    teacher, _ = teacher_model(spec, num_classes, in_channels, image_size)
    teacher.model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    return teacher
