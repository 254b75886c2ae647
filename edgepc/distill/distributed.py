"""The global batch under data parallelism: every rank ranks all N·B embeddings.

``gather_with_grad`` concatenates the embeddings of all ranks in rank order; gradient flows
to the local part. Its backward sums the gradient over ranks, so that after
DistributedDataParallel averages parameter gradients the update equals the single-process
update on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_padded(x: Tensor) -> tuple[list[Tensor], list[int]]:
    """all_gather for local batches of different sizes: pad to the largest, then trim."""
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return [p[:n] for p, n in zip(parts, counts, strict=True)], counts


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        parts, counts = _all_gather_padded(x)
        rank = dist.get_rank()
        ctx.local = (sum(counts[:rank]), sum(counts[: rank + 1]))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's embeddings
        start, stop = ctx.local
        return grad[start:stop]


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' rows of ``x`` in rank order (``x`` itself when not distributed)."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """All ranks' rows of ``x`` in rank order, without gradient (teacher side)."""
    return torch.cat(_all_gather_padded(x)[0]) if world_size() > 1 else x
