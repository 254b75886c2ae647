"""The coherence core on a CUDA device: parity with CPU, mixed precision, bounded memory.

These run wherever torch sees a GPU (the project's CI machine has none: there they are
reported as skipped, never as passed).
"""

import pytest
import torch

from edgepc.coherence import (
    coherence_metrics,
    perception_coherence_loss,
    perception_coherence_loss_reference,
)
from edgepc.measure import peak_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("teacher_ranks", ["soft", "hard"])
def test_cuda_loss_matches_cpu_reference(metric, teacher_ranks):
    student, teacher = torch.randn(96, 16), torch.randn(96, 40)
    options = {"dissimilarity": metric, "teacher_ranks": teacher_ranks}
    values, grads = [], []
    for fn, device in [
        (perception_coherence_loss, "cuda"),
        (perception_coherence_loss_reference, "cpu"),
    ]:
        s = student.to(device).requires_grad_()
        loss = fn(s, teacher.to(device), **options)
        loss.backward()
        values.append(loss.detach().cpu())
        grads.append(s.grad.cpu())
    torch.testing.assert_close(values[0], values[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_training_step_is_float32_and_finite(dtype):
    net = torch.nn.Linear(64, 32).cuda()
    x, teacher = torch.randn(256, 64, device="cuda"), torch.randn(256, 128, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        features = net(x)
        loss = perception_coherence_loss(features, teacher)
    assert features.dtype == dtype
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(net.weight.grad).all()
    reference = perception_coherence_loss(features.detach().float(), teacher)
    torch.testing.assert_close(loss.detach(), reference)


def test_cuda_peak_memory_bounded_against_reference():
    b = 1024
    student = torch.randn(b, 128, device="cuda", requires_grad=True)
    teacher = torch.randn(b, 512, device="cuda")
    peaks = {}
    for name, fn in [
        ("bounded", perception_coherence_loss),
        ("reference", perception_coherence_loss_reference),
    ]:
        student.grad = None
        with peak_memory("cuda") as peak:
            fn(student, teacher).backward()
        peaks[name] = peak.bytes
    assert peaks["bounded"] <= peaks["reference"] / 8
    assert peaks["reference"] > 4 * b**3  # it does hold a B³ float32 tensor


def test_cuda_metrics_equal_cpu():
    student, teacher = torch.randn(700, 24), torch.randn(700, 48)
    on_gpu = coherence_metrics(student.cuda(), teacher.cuda(), block_rows=128)
    on_cpu = coherence_metrics(student, teacher, block_rows=128)
    assert on_gpu.triplet_agreement == pytest.approx(on_cpu.triplet_agreement, abs=1e-9)
    assert on_gpu.rank_gap == pytest.approx(on_cpu.rank_gap, abs=1e-9)
    assert on_gpu.spearman == pytest.approx(on_cpu.spearman, abs=1e-9)
