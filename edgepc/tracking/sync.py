"""``python -m edgepc.tracking.sync [--uri URI]``: replay what pipelines spooled while MLflow was
down (see :mod:`edgepc.tracking`), oldest first, into the store they were meant for (or URI).

Each spool file is replayed in order; runs created while the store was down get their real ids
here. Progress is kept after every operation, so a sync that fails half way (the store down
again) goes on from there next time. A replayed spool file and its copies are removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from edgepc.errors import EdgepcError
from edgepc.files import write_text
from edgepc.tracking import OPS, open_store, spool_folder


def replay(spool: Path, uri: str | None = None) -> tuple[int, str]:
    """Replay one spool file; returns (operations replayed now, the store's uri)."""
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
    lines = spool.read_text().splitlines()
    if lines and not spool.read_text().endswith("\n"):
        lines.pop()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepc.tracking.sync", description=__doc__)
    parser.add_argument("--uri", help="replay into this store instead of the one spooled for")
    parser.add_argument("--spool", type=Path, default=None, help=f"default {spool_folder()}")
    args = parser.parse_args(argv)
    folder = args.spool or spool_folder()
    spools = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not spools:
        print(f"nothing to sync in {folder}")
        return 0
    try:
        for spool in spools:
            count, uri = replay(spool, args.uri)
            print(f"{spool.name}: replayed {count} operations into {uri}")
    except EdgepcError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
