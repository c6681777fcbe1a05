"""torch.distributed in one place: process-group set-up from torchrun's environment.

A plain single process needs no process group. Under ``torchrun`` (which sets ``MASTER_ADDR``) there
is one, even with one process: ``torchrun --nproc_per_node 1`` then runs the same DDP or FSDP code
as a larger job, which is how the FSDP path is checked on a one-GPU machine. The backend is NCCL on
CUDA and gloo on CPU. Multi-node: see README ("Many GPUs, many nodes").
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # a process group exists (torchrun, any world size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.group


def init_distributed(device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not ("RANK" in os.environ and "MASTER_ADDR" in os.environ):
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, group=True)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when the flag is set on any process (used for stop requests)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def cleanup(info: DistInfo) -> None:
    """Leave the process group: every process first finishes its last collective (barrier), then the
    group is destroyed and its objects collected while the interpreter is fully alive. A gloo group
    freed only at interpreter exit (FSDP's device mesh keeps a reference) can abort the process
    after all its work is done."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
