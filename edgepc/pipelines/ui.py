"""``python -m edgepc.pipelines.ui [--port 5000]``: the MLflow UI over edgepc's store, and the
link to open in it: the ``edgepc`` experiment's runs table."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from edgepc.tracking import EXPERIMENT, artifact_root, open_store, store_folder, tracking_uri


def runs_page(address: str, experiment_id: str) -> str:
    """The runs table of an experiment in MLflow 3's UI. Its sidebar starts in GenAI mode (the
    traces overview, empty for edgepc) in a browser that has not chosen yet; the experiment's
    ``mlflow.experimentKind`` tag alone does not change that in 3.17, this link does."""
    return f"{address}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepc.pipelines.ui", description=__doc__)
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    uri = tracking_uri()
    if uri.startswith("http"):
        print(f"MLFLOW_TRACKING_URI is a server already: open {uri}")
        return 0
    experiment_id = open_store(uri, EXPERIMENT)[1]
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--default-artifact-root", (artifact_root(uri) or store_folder() / "artifacts").as_uri(),
        "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI over {uri}; Ctrl-C stops it. Open the pipeline runs at")
    print(f"  {runs_page(f'http://127.0.0.1:{args.port}', experiment_id)}")
    print("one parent run per pipeline, a child run per stage; select runs and press Compare to")
    print("line up test_knn_top1 and pc_* across runs")
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
