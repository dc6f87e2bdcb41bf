"""The order in which examples reach each process: seeded, sharded, and resumable mid-epoch.

* `EpochSampler` (training): a permutation drawn from (seed, epoch), dealt out to the
  processes (rank r takes every world-th index, all ranks the same number), and able to
  start an epoch part-way: a run resumed from a checkpoint taken after b batches of epoch e
  skips those b batches instead of seeing them again.
* `ShardSampler` (validation, test): every index exactly once across the processes, with
  no padding, so that a metric summed over the processes counts each image once (a
  `DistributedSampler` would repeat images to even the shards out).
* `ResumableLoader`: a DataLoader that Lightning saves and restores with a checkpoint
  (Lightning calls `state_dict` / `load_state_dict` on stateful loaders).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """Training order: a seeded permutation per epoch, this rank's share, resumable mid-epoch."""

    def __init__(self, length: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.length, self.batch_size, self.seed, self.rank, self.world = length, batch_size, seed, rank, world
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.world

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator)[self.rank::self.world][: len(self)]
        skip = 0
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            skip = self.resume_at[1] * self.batch_size
            self.resume_at = None
        yield from order[skip:].tolist()


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... below length: each index on exactly one process."""

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.indices = range(rank, length, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler` whose position goes into Lightning's checkpoints.

    `progress()` returns (epoch, batches trained in it); it comes from the trainer, because the
    loader itself runs ahead of training (prefetching) and cannot know what was trained.
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict:
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume_at = (state["epoch"], state["batches"])
