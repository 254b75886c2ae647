"""``python3 -m edgepc_device COMMAND BUNDLE [options]``: the on-device commands.

    cpu BUNDLE [--threads 1 2] [--warmup 20] [--iterations 300] [--out FILE]   onnxruntime
    mobile BUNDLE [--threads 1 2] ...          the LiteRT / TFLite interpreter (XNNPACK)
    jetson BUNDLE [--engine FILE] [--batch 64] ...   TensorRT (builds the engine if needed)
    build-engine BUNDLE [--max-batch 64] [--force]   only the TensorRT build

Each verifies the bundle, runs its whole test set, computes top-1 and pc_* against the teacher
embeddings it ships, times batch 1, and writes report-<bundle>-<host>.json.
"""

from __future__ import annotations

import sys

from edgepc_device import build_engine, jetson
from edgepc_device.validate import fail, validate

COMMANDS = {
    "cpu": lambda argv: validate("cpu", argv),
    "mobile": lambda argv: validate("mobile", argv),
    "jetson": jetson.main,
    "build-engine": build_engine.main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return fail(f"give a command: {', '.join(COMMANDS)}")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
