"""Where this process stands in a torchrun job: rank, world size, device; join, wait, leave.

Why a module of its own: `pigeon pretrain` and `pigeon embed` both run unchanged under
`torchrun --nproc-per-node N [--nnodes M]` (gloo on CPU, nccl on GPUs) and alone; the job layout
is torchrun's (its environment variables), never pigeon's own scheduler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 when run alone) and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run alone. With CUDA each
    process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if device is None:
        device = f"cuda:{local}" if cuda else "cpu"
    elif cuda and world > 1:
        device = f"cuda:{local}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        started = True
    if world > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank=rank, world=world, local_rank=local, device=device, started_here=started)


def barrier(d: Dist) -> None:
    """Wait for every process (the main one writes shared files while the others wait)."""
    if d.world > 1:
        dist.barrier()


def teardown(d: Dist) -> None:
    """Leave the process group once all processes are done, if this run joined it."""
    barrier(d)
    if d.started_here:
        dist.destroy_process_group()


def all_ok(d: Dist, ok: bool) -> bool:
    """True when `ok` holds on every process (so all stop together when one fails)."""
    if d.world == 1:
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int64, device=d.device)  # nccl reduces device tensors only
    dist.all_reduce(t)
    return int(t.item()) == 0
