"""The teacher a user brings, by ``teacher.model``:

- a zoo name (``resnet18``, ``efficientnet_lite0`` ...), trained here or loaded from
  ``teacher.checkpoint``;
- ``torchvision:<architecture>``, any torchvision classification model, with
  ``teacher.checkpoint`` a local state dict of it; when its head has another class count than
  the data, the head is replaced and the whole model fine-tuned (``teacher.train``); the
  embedding is the input of its last linear layer;
- a ``torch.export`` program file (``*.pt2``) whose outputs are ``(logits, embedding)``, used
  as it is (exported in eval mode, never trained), with a dynamic batch dimension.

Zoo and torchvision teachers are built as students are (:mod:`edgepc.models.specs`); on
one-channel data a torchvision teacher is exactly the network on the image repeated to RGB.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from edgepc.errors import ModelError
from edgepc.files import atomic_path
from edgepc.models.specs import model_from_spec
from edgepc.models.taps import EmbeddingModel, pool_to_vector

PROGRAM = ".pt2"


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
    return model_from_spec(spec, num_classes, in_channels, image_size, checkpoint, "teacher")


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
