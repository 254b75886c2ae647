"""What could not reach the store: a spool of write operations, and their replay.

Each spool file is one tracker's operations in order (one JSON line each), with the artifact
files it named copied beside it. :func:`replay` runs them against the store once it is back;
runs created while the store was down get their real ids there. Progress is kept after every
operation, so a replay that fails half way goes on from there next time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from edgepc.errors import EdgepcError
from edgepc.files import write_text
from edgepc.tracking.ops import OPS
from edgepc.tracking.store import open_store


def spool_folder() -> Path:
    """``$EDGEPC_SPOOL``, else ``mlflow-spool`` in the working directory."""
    env = os.environ.get("EDGEPC_SPOOL")
    return Path(env) if env else Path.cwd() / "mlflow-spool"


class Spool:
    """Operations that could not reach the store, in order: one JSON line each in
    ``<folder>/<id>.jsonl``, artifact files copied to ``<folder>/<id>/``."""

    def __init__(self, folder: Path, uri: str, experiment: str) -> None:
        self.folder, self.uri, self.experiment = folder, uri, experiment
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = folder / f"{self.id}.jsonl"
        self.count = 0

    def add(self, op: str, args: dict[str, Any]) -> None:
        if "path" in args:  # the file as it is now: the cache may change before the replay
            source = Path(args["path"])
            kept = self.folder / self.id / f"{self.count:05d}" / source.name
            kept.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, kept)
            args = {**args, "path": str(kept)}
        self.folder.mkdir(parents=True, exist_ok=True)
        line = {"op": op, "args": args, "uri": self.uri, "experiment": self.experiment}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.count += 1


def replay(spool: Path, uri: str | None = None) -> tuple[int, str]:
    """Replay one spool file; returns (operations replayed now, the store's uri). A replayed
    spool file and its copies are removed."""
    lines = []
    for n, text in enumerate(_complete_lines(spool), start=1):
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            raise EdgepcError(
                f"line {n} of the spool {spool} is not valid JSON: move the file aside "
                "(its other runs are lost to the store then) or mend the line, and sync again"
            ) from None
    if not lines:
        spool.unlink()
        return 0, uri or ""
    uri = uri or lines[0]["uri"]
    progress = spool.with_suffix(".progress.json")
    state = json.loads(progress.read_text()) if progress.exists() else {"done": 0, "ids": {}}
    ids: dict[str, str] = state["ids"]
    try:
        client = open_store(uri, lines[0]["experiment"])[0]
    except Exception as error:  # the store cannot even be opened
        raise _stopped(spool, uri, state["done"], len(lines), error) from None
    for n, line in enumerate(lines[state["done"] :], start=state["done"]):
        args = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in line["args"].items()}
        local = args.pop("local_id", None)
        try:
            result = OPS[line["op"]](client, uri, **args)
        except Exception as error:  # the store failed again: keep what was done
            write_text(progress, json.dumps({"done": n, "ids": ids}))
            raise _stopped(spool, uri, n, len(lines), error) from None
        if local is not None:
            ids[local] = result
    count = len(lines) - state["done"]
    progress.unlink(missing_ok=True)
    shutil.rmtree(spool.with_suffix(""), ignore_errors=True)
    spool.unlink()
    return count, uri


def _stopped(spool: Path, uri: str, done: int, total: int, error: Exception) -> EdgepcError:
    reason = " ".join(str(error).split())[:200]
    return EdgepcError(
        f"replaying {spool.name} into {uri} failed at operation {done + 1} of {total} "
        f"({type(error).__name__}: {reason}): run the sync again once MLflow answers; it goes "
        "on from there"
    )


def _complete_lines(spool: Path) -> list[str]:
    """The spool's lines, without a last one cut short by a crash while it was written."""
    text = spool.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    return lines
