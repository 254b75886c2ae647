"""Files that appear complete or not at all, and a full disk as one clear error.

Every file edgepc writes goes through :func:`atomic_path`: the writer fills a temporary file
beside the target, which is fsync'ed and renamed over it. A crash, a kill or a full disk
leaves the previous file (or none), never half of one; an error removes the temporary file, and
the temporary files of a killed writer are removed by :func:`remove_stale_temporaries` when the
work resumes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgepc.errors import EdgepcError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp")  # .<name>.<pid>.tmp<suffix>, see atomic_path


class DiskFullError(EdgepcError):
    """A file could not be written for lack of space (or over the file-size limit)."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path (same folder and suffix) for the caller to write; on success
    it replaces ``path``, on any error it is removed and the error re-raised, as
    :class:`DiskFullError` when the disk was full."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if no_space(error) and not isinstance(error, DiskFullError):  # inner write named it
            raise DiskFullError(
                f"no space left on the disk of {path.parent} while writing {path.name}: free "
                "some space (or point --cache / EDGEPC_CACHE elsewhere) and rerun; finished "
                "stages and epochs are kept"
            ) from None
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files under ``folder`` whose writer process is gone (killed while
    writing: ``kill -9`` runs no cleanup); returns them."""
    stale = []
    for path in folder.rglob(".*.tmp*"):
        match = TEMPORARY.match(path.name)
        if match and path.is_file() and not _alive(int(match[1])):
            path.unlink(missing_ok=True)
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def no_space(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is the disk being full. Writers
    that go through C++ (torch.save) wrap the OSError in their own exception."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        error = error.__cause__ or error.__context__
    return False


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def save_figure(fig: Figure, path: Path) -> Path:
    """A matplotlib figure as an image file (its format from the suffix); the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.removeprefix("."))
    finally:
        plt.close(fig)
    return path


@contextlib.contextmanager
def npy_rows(path: Path, rows: int) -> Iterator[Callable[[np.ndarray], None]]:
    """Write a ``(rows, d)`` float32 ``.npy`` file a block of rows at a time, through
    :func:`atomic_path`: the caller gets ``append(block)``; only the first block's width is
    needed up front. Plain sequential writes (not a memory map), so a full disk is a
    :class:`DiskFullError` and never a SIGBUS. Read it back with ``np.load(path, mmap_mode=...)``.
    """
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        written = 0

        def append(block: np.ndarray) -> None:
            nonlocal written
            block = np.ascontiguousarray(block, dtype=np.float32)
            if written == 0:
                header = {"descr": "<f4", "fortran_order": False, "shape": (rows, block.shape[1])}
                np.lib.format.write_array_header_1_0(handle, header)
            handle.write(block.tobytes())
            written += len(block)

        yield append
        if written != rows:
            raise ValueError(f"{path.name}: {written} rows written, {rows} announced")
