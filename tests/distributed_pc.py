"""Run with ``torchrun --nproc_per_node=N tests/distributed_pc.py OUT.json``: every rank computes
the PC loss on the gathered global batch; rank 0 writes each rank's loss and local gradient."""

import json
import sys

import torch
import torch.distributed as dist

from edgepc.coherence import perception_coherence_loss
from edgepc.distill.distributed import gather, gather_with_grad


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    sizes = [7 + 3 * r for r in range(world)]  # unequal local batches on purpose
    student = torch.randn(sum(sizes), 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(sum(sizes), 10, generator=gen, dtype=torch.float64)
    start = sum(sizes[:rank])
    local = student[start : start + sizes[rank]].clone().requires_grad_()
    loss = perception_coherence_loss(
        gather_with_grad(local), gather(teacher[start : start + sizes[rank]])
    )
    loss.backward()
    results = [None] * world
    dist.all_gather_object(results, {"loss": loss.item(), "grad": local.grad.tolist()})
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"sizes": sizes, "ranks": results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
