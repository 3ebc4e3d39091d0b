"""Fine-tuning under torchrun: joining the process group, sharding the training data over the processes,
and ending with the same BatchNorm statistics in every process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from ..data import DataSpec
from ..errors import SurgeryError

__all__ = ["join_process_group", "sync_buffers", "train_loader"]


def join_process_group() -> tuple[int, int, bool]:
    """Join the process group when torchrun started several processes (WORLD_SIZE > 1): nccl on GPU, gloo on CPU.

    Returns:
        tuple: (rank, world size, whether this call started the process group).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        started = True
    return dist.get_rank(), dist.get_world_size(), started


def train_loader(spec: DataSpec, *, rank: int, world: int):
    """The training loader: ``spec``'s images shuffled and sharded over the processes.

    Args:
        spec: the training images.
        rank: this process.
        world: the number of processes.

    Returns:
        tuple: (the loader, the sampler to tell each epoch; None when a single process uses a given
        DataLoader as it is).
    """
    if world == 1 and isinstance(spec.data, DataLoader) and spec.num_images is None:
        return spec.data, None
    # as_loader turns a path into an ImageFolder and takes the seeded subset; shard and shuffle its dataset.
    base = spec.loader()
    if isinstance(base.dataset, IterableDataset):
        raise SurgeryError("fine-tuning needs a map-style Dataset (with __len__ and __getitem__), not an IterableDataset")
    sampler = DistributedSampler(base.dataset, num_replicas=world, rank=rank, shuffle=True, seed=spec.seed)
    loader = DataLoader(base.dataset, batch_size=base.batch_size or spec.batch_size, sampler=sampler,
                        num_workers=base.num_workers, collate_fn=base.collate_fn)
    return loader, sampler


def sync_buffers(model: nn.Module, world: int) -> None:
    """Average floating buffers (BatchNorm statistics) over processes and take rank 0's counters, so every
    process ends with the same state_dict.

    Args:
        model: the student (its buffers change in place).
        world: the number of processes (1: nothing to do).
    """
    if world == 1:
        return
    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b /= world
        else:
            dist.broadcast(b, src=0)
