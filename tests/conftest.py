import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from edgepc.data import channel_stats, load_dataset, make_splits
from edgepc.distill.images import Normalisation
from edgepc.distill.trainer import TrainConfig, train
from edgepc.export.bundle import TESTSET, Normalise, write_bundle, write_testset
from edgepc.export.runtimes import normalise
from edgepc.models import build_model
from edgepc.quant import convert
from edgepc.quant.finetune import ptq

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _spool(tmp_path_factory):
    """Tracking that a failing store spools stays out of the project (subprocesses inherit)."""
    os.environ["EDGEPC_SPOOL"] = str(tmp_path_factory.mktemp("spool"))


def random_rotation(dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=dtype))
    return q


def start_ui(uri: str) -> tuple[subprocess.Popen, str]:
    """``python -m edgepc.pipelines.ui`` over the store ``uri`` on a free port, answering: the
    process (its own group) and its address."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    ui = subprocess.Popen(
        [sys.executable, "-m", "edgepc.pipelines.ui", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2):
                return ui, address
        except OSError:
            time.sleep(0.5)
    stop_ui(ui)
    raise AssertionError("the MLflow UI did not answer within 120 s")


def stop_ui(ui: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    os.killpg(ui.pid, sig)
    ui.wait(timeout=30)


@contextmanager
def mlflow_ui(uri: str) -> Iterator[str]:
    """:func:`start_ui` for a block; yields its address and stops it afterwards."""
    ui, address = start_ui(uri)
    try:
        yield address
    finally:
        stop_ui(ui)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A tiny CNN trained briefly on real Fashion-MNIST, its PTQ int8 graph (cpu recipe and
    jetson's symmetric one), and a test set file with 300 real test images."""
    d = load_dataset("fashion-mnist", download=False)
    s = make_splits(d.train_labels, train_limit=600, seed=0)
    x, y = d.train_images[s.train], d.train_labels[s.train]
    norm = Normalisation(*map(tuple, channel_stats(x)))
    torch.manual_seed(0)
    model = build_model("tiny_cnn")
    train(model, x, y, norm, TrainConfig(epochs=2, lr=3e-3), CPU, progress=False)
    model.eval()
    int8 = {t: convert(ptq(model, t, x[:256], norm)) for t in ("cpu", "jetson")}
    int8["mobile"] = int8["cpu"]
    folder = tmp_path_factory.mktemp("testset")
    teacher = torch.randn(300, 16).numpy()  # any reference embeddings of the first images
    testset = write_testset(folder / TESTSET, d.test_images[:300].numpy(),
                            d.test_labels[:300].numpy(), teacher)  # fmt: skip
    spec = Normalise(mean=list(norm.mean), std=list(norm.std))
    return model, int8, testset, spec, d.classes


def bundle(tmp_path, setup, target, source):
    model, int8, testset, spec, classes = setup
    example = normalise(np.load(testset)["images"][:2], spec.mean, spec.std)
    chosen = model if source == "fp32" else int8[target]
    folder = tmp_path / f"{target}-{'fp32' if source == 'fp32' else 'int8'}"
    return write_bundle(folder, chosen, torch.from_numpy(example), target, source, testset,
                        spec, list(classes))  # fmt: skip
