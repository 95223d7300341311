"""Data-parallel training across processes and machines with ``torchrun``.

``torchrun --nproc_per_node=N -m spikegrad train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; ``init()`` then joins the process group (gloo on CPU, NCCL on GPU).
Without those variables everything here is a no-op for a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "init", "wrap", "barrier"]


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates and writes checkpoints."""
        return self.rank == 0


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group when launched by torchrun; returns the world and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def wrap(net: nn.Module, world: World, device: torch.device, sync_bn: bool) -> nn.Module:
    """``net`` in DistributedDataParallel (and SyncBatchNorm, CUDA only) when there are several ranks."""
    if world.size <= 1:
        return net
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("config key 'sync_bn' needs CUDA (SyncBatchNorm has no CPU implementation)")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


def barrier(world: World) -> None:
    """Wait for every rank (no-op for one process)."""
    if world.size > 1:
        dist.barrier()
