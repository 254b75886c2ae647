"""The global batch under data parallelism (``torchrun``): every rank ranks all N·B embeddings.

``gather_with_grad`` concatenates the outputs of all ranks in rank order; gradient flows to
the local part. Its backward sums the gradient over ranks, so that after
DistributedDataParallel averages parameter gradients the update equals the single-process
update on the concatenated batch. ``sync_batchnorm`` makes batch norm use the statistics of
the global batch too (torch's SyncBatchNorm on GPUs, :class:`GlobalBatchNorm` on CPUs, where
torch has none), so that N ranks of B images train exactly like one process of N·B.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if world_size() > 1 else 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs,
    gloo on CPUs); False when not launched by torchrun with more than one process. Rank 0 may
    spend hours on stages the others wait for (export, validation): the timeout is long."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return True


def local_device(device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA device under torchrun, else ``device``."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank (``value`` itself when not distributed)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing when not distributed)."""
    if world_size() > 1:
        dist.barrier()


def shard(rows: Tensor) -> Tensor:
    """This rank's contiguous part of a global batch (parts in rank order, sizes within 1)."""
    return rows.tensor_split(world_size())[rank()] if world_size() > 1 else rows


class _SumOverRanks(torch.autograd.Function):
    """Differentiable all-reduce (sum): the backward of a sum over ranks is a sum over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks, on any device (same state as
    BatchNorm1d/2d): a differentiable all-reduce of the per-channel sums, then of the squared
    deviations from the global mean (two passes, like torch's own variance)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        total = _SumOverRanks.apply
        count = total(x.new_tensor([x.numel() / x.shape[1]]))
        mean = total(x.sum(dims)) / count
        var = total((x - mean.view(shape)).square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every batch norm computing global-batch statistics (state kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
            child, GlobalBatchNorm
        ):
            synced = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced.to(device))
        else:
            sync_batchnorm(child, device)
    return model


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
