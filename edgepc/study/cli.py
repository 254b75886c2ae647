"""The comparison study: perception coherence against the baselines, under one protocol.

    python benchmarks/compare_losses.py                     # configs/study.yaml → RESULTS.md
    python benchmarks/compare_losses.py --pairs mnist-tiny  # one pair (the report holds all done)
    python benchmarks/compare_losses.py --jobs 2             # two processes, a core each
    python benchmarks/compare_losses.py --profile smoke --out /tmp/study/RESULTS.md   # CI

Every run is an ordinary pipeline run up to the distill stage (the deployed int8 rows: up to
validate) in the MLflow store, tagged ``edgepc.study``. For each pair, setting and method, the
trials of the grid are trained with the first seed and the best on the validation split is
trained with every seed; the report shows test-split mean ± std. A run whose config (cache key)
is already in the store is read back, not retrained: a rerun regenerates the report in seconds
and trains only what changed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from edgepc.errors import EdgepcError
from edgepc.files import write_text
from edgepc.pipelines.config import CONFIGS, ConfigError
from edgepc.pipelines.runner import default_cache
from edgepc.study.execute import Executor, Recorded, train_in_parallel
from edgepc.study.protocol import Record, Run, deploy_plan, load_study, plan
from edgepc.study.report import report
from edgepc.tracking import Tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIGS / "study.yaml")
    parser.add_argument("--profile", help="a profile of the study config (smoke)")
    parser.add_argument("--pairs", nargs="+", help="train only these pairs (default: all)")
    parser.add_argument(
        "--methods", nargs="+",
        help="train only these methods (default: all); e.g. split a pair across processes",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("docs") / "RESULTS.md")
    parser.add_argument("--cache", type=Path, default=None, help=f"default {default_cache()}")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the project's)")
    parser.add_argument(
        "--report-only", action="store_true",
        help="train nothing: report what the store holds (a method with a missing run: no row)",
    )  # fmt: skip
    parser.add_argument(
        "--records", type=Path,
        help="committed records to read runs back from (default: --out with .json; none: "
        "read only MLflow)",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="train in this many processes, the cores split between them (default 1)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        study = load_study(args.config, args.profile)
        pairs = args.pairs or list(study.pairs)
        unknown = sorted(set(pairs) - set(study.pairs))
        if unknown:
            raise ConfigError(f"unknown pairs {unknown}; the study has {list(study.pairs)}")
        if args.methods:
            unknown = sorted(set(args.methods) - set(study.methods))
            if unknown:
                raise ConfigError(f"unknown methods {unknown}; the study has {study.methods}")
            study = study.model_copy(update={"methods": args.methods})
        tracker = Tracker(args.tracking_uri)
        records_path = args.records or args.out.with_suffix(".json")
        recorded = Recorded.read(records_path) if str(args.records) != "none" else Recorded.none()
        execute = Executor(study, tracker, args.cache or default_cache(), args.report_only,
                           recorded)  # fmt: skip
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: give 1 or more processes")
        if args.jobs > 1 and not args.report_only:
            train_in_parallel(study, pairs, execute, args.jobs, args.tracking_uri)
        records: list[Record] = []
        missing: list[Run] = []  # read-only mode: the first missing run of each method
        bar = tqdm(desc=study.name, unit="run")
        for record in plan(study, pairs, execute, missing):
            records.append(record)
            bar.set_postfix_str(record.run.label)
            bar.update()
        records += list(deploy_plan(study, records, execute, missing))
        bar.close()
    except (EdgepcError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "python benchmarks/compare_losses.py " + " ".join(argv or sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = report(study, records, pairs, args.out, command.strip(),
                  time.perf_counter() - started, execute.devices, missing)  # fmt: skip
    write_text(args.out, text)
    raw = {"study": study.model_dump(), "python": platform.python_version(),
           "trained": execute.trained, "reused": execute.reused, "devices": execute.devices,
           "records": [{"run": asdict(r.run), "phase": r.phase, "metrics": r.metrics}
                       for r in records],
           "kept": execute.kept()}  # fmt: skip
    write_text(args.out.with_suffix(".json"), json.dumps(raw, indent=1))
    print(
        f"{execute.trained} runs trained, {execute.reused} read back from the records or "
        f"MLflow; {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
