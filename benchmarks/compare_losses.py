"""The comparison study, run from the repository root: ``python benchmarks/compare_losses.py
--help`` (the code: edgepc.study)."""

import sys

from edgepc.study.cli import main

if __name__ == "__main__":
    sys.exit(main())
