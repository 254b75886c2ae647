"""The coherence loss over the global batch with torchrun (gloo, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgepc.coherence import perception_coherence_loss
from edgepc.distill.distributed import gather, gather_with_grad, world_size
from tests.conftest import free_port


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_loss_equals_single_process(tmp_path, world):
    out = tmp_path / "ranks.json"
    script = Path(__file__).with_name("distributed_pc.py")
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    sizes = result["sizes"]
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(sum(sizes), 6, generator=gen, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(sum(sizes), 10, generator=gen, dtype=torch.float64)
    single = perception_coherence_loss(student, teacher)
    single.backward()
    start = 0
    for rank, (size, got) in enumerate(zip(sizes, result["ranks"], strict=True)):
        assert got["loss"] == pytest.approx(single.item(), rel=1e-12), rank
        # Backward sums over ranks (each computed the same loss): world × the true gradient,
        # which DistributedDataParallel's averaging brings back to the single-process update.
        expected = world * student.grad[start : start + size]
        torch.testing.assert_close(torch.tensor(got["grad"], dtype=torch.float64), expected)
        start += size


def test_without_a_process_group_gathering_is_the_identity():
    x = torch.randn(4, 3, requires_grad=True)
    assert world_size() == 1
    assert gather_with_grad(x) is x
    assert gather(x) is x


TINY = [
    "--until", "distill", "--no-progress", "data.train_limit=400",
    "data.test_limit=1000", "teacher.model=tiny_cnn",
    "teacher.train.epochs=1", "teacher.train.augment=false", "teacher.train.optimizer=sgd",
    "teacher.train.lr=0.05", "distill.student=tiny_cnn", "distill.train.epochs=2",
    "distill.train.optimizer=sgd", "distill.train.lr=0.02", "distill.train.alpha=1",
    "distill.train.beta=1", "distill.pc_eval_limit=200",
]  # fmt: skip


def _pipeline(tmp_path: Path, name: str, batch: int, ranks: int) -> dict[str, Path]:
    """The cpu pipeline up to distill with per-rank ``batch``, on ``ranks`` processes."""
    launcher = [sys.executable, "-m", "edgepc.pipelines.run"]
    if ranks > 1:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "edgepc.pipelines.run",
        ]  # fmt: skip
    cache = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / name}.db"}  # fmt: skip
    batches = [f"teacher.train.batch_size={batch}", f"distill.train.batch_size={batch}"]
    command = [*launcher, "cpu", "--cache", str(cache), *TINY, *batches]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("MLflow parent run") == 1  # one summary: rank 0's
    return {p.name.split("-")[0]: p for p in cache.iterdir() if p.is_dir()}  # not the locks


def _state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / name, weights_only=True)


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item()
               for k in a if a[k].is_floating_point())  # fmt: skip


@pytest.mark.slow
def test_torchrun_training_equals_one_process_with_the_global_batch(tmp_path):
    one = _pipeline(tmp_path, "one", 64, 1)
    two = _pipeline(tmp_path, "two", 32, 2)  # 2 ranks × 32 = the same global batch of 64
    small = _pipeline(tmp_path, "small", 32, 1)  # one process at the per-rank batch: not equal
    assert sorted(two) == ["data", "distill", "teacher"]  # rank 1 left no scratch folder
    for stage, file in (("teacher", "teacher.pt"), ("distill", "student.pt")):
        gap = _gap(_state(one[stage], file), _state(two[stage], file))
        other = _gap(_state(one[stage], file), _state(small[stage], file))
        print(f"{stage}: max |Δ| torchrun vs one process {gap:.2e}, vs the local batch {other:.2e}")
        assert gap < 1e-3, stage
        assert other > 30 * gap, stage  # the bound tells a global batch from a local one
        histories = [_state(d[stage], "training.pt")["history"] for d in (one, two)]
        for a, b in zip(*histories, strict=True):  # α·CE + β·L_PC over the global batch
            losses = [k for k in a if k.startswith("loss")]
            assert ("loss_pc" in losses) == (stage == "distill")
            # Float rounding differs between half and whole batches and grows over the steps.
            expected = pytest.approx([a[k] for k in losses], rel=1e-4, abs=1e-5)
            assert [b[k] for k in losses] == expected
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'two'}.db").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{tmp_path / 'two'}.db")
         .search_experiments()]
    )  # fmt: skip
    assert len(runs) == 4  # rank 0's parent and three stage runs; rank 1 logs nothing
