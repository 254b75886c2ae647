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
