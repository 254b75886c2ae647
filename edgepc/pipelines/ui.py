"""``python -m edgepc.pipelines.ui [--port 5000]``: the MLflow UI over edgepc's store."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from edgepc.tracking import STORE, artifact_root, tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepc.pipelines.ui", description=__doc__)
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    uri = tracking_uri()
    if uri.startswith("http"):
        print(f"MLFLOW_TRACKING_URI is a server already: open {uri}")
        return 0
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--default-artifact-root", (artifact_root(uri) or STORE / "artifacts").as_uri(),
        "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI on http://127.0.0.1:{args.port} (store {uri}); Ctrl-C stops it")
    print("look at: experiment 'edgepc' -> one parent run per pipeline, a child run per stage;")
    print("select runs and press Compare to line up test_knn_top1 and pc_* across runs")
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
