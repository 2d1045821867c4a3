"""Data-parallel training under torch's own launcher: ``torchrun --nproc_per_node=N -m pipeline.train``.

``make train NPROC=N`` starts N processes; each trains the same fold on its share of every batch
(DistributedDataParallel averages the gradients), so all ranks hold identical weights, optimizer,
scheduler and early-stopping state. Evaluation is sharded too: each rank predicts a contiguous slice
of the rows and :func:`gather_rows` concatenates the slices in rank order on every rank, so every rank
computes the same metric and takes the same early-stopping decision without further messages. Only
rank 0 writes files; the others wait at :func:`barrier` where they read them.

The backend is NCCL with one GPU per process when CUDA exists, gloo on CPU (which is how the tests run
it). Without torchrun's environment (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()  # one process: what every function here sees outside torchrun


def init(device_kind: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment; Dist() when not under torchrun.

    ``device_kind``: ``cuda`` or ``cpu`` once known, ``auto`` to pick NCCL when CUDA exists.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_kind == "auto" else device_kind == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank)


def close(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shard(indices: np.ndarray, d: Dist) -> np.ndarray:
    """This rank's contiguous slice of ``indices`` (slices of all ranks, in rank order, are ``indices``)."""
    return np.array_split(indices, d.world)[d.rank] if d.enabled else indices


def gather_rows(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rows of :func:`shard` slices) in rank order, on every rank."""
    if not d.enabled:
        return x
    parts: list = [None] * d.world
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts)


def sum_scalar(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum over ranks of a 0-d tensor (a copy; ``value`` is unchanged)."""
    if not d.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out
