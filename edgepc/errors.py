"""The typed errors a user can meet; each message says what is wrong and what to do."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


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


def one_line_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A command's ``main``: an :class:`EdgepcError` ends it with ``error: <message>`` on
    stderr and exit status 2, nothing else."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except EdgepcError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapped


def first_problem(error: ValidationError) -> str:
    """The first thing a pydantic validation found wrong, as ``where: what``."""
    first = error.errors()[0]
    return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"
