"""``python -m edgepc.tracking.sync [--uri URI]``: replay what pipelines spooled while MLflow was
down (see :mod:`edgepc.tracking.spool`), oldest first, into the store they were meant for (or
URI). A sync that fails half way (the store down again) goes on from there next time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgepc.errors import one_line_errors
from edgepc.tracking.spool import replay, spool_folder


@one_line_errors
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
    for spool in spools:
        count, uri = replay(spool, args.uri)
        print(f"{spool.name}: replayed {count} operations into {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
