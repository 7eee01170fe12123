"""Samplers and data loaders for iteration-based training and sharded evaluation.

Training draws from one infinite *global* stream of dataset indices: the concatenation of
permutations ``perm(seed + 0), perm(seed + 1), ...`` (one per pass over the data). Rank ``r``
of ``world_size`` takes global positions ``r, r + world_size, r + 2·world_size, ...``, so
ranks never draw the same position and a resumed run continues the very same stream.

The training loader hands the dataset ``(index, seed)`` pairs whose seed is a hash of
(run seed, global position): the augmentation of every draw is fixed by the run seed and
the draw's place in the stream, whatever the number of workers, and is reproduced exactly
after a resume from ``start_iter``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "InfiniteSampler",
    "SeededSampler",
    "ShardedSampler",
    "build_test_loader",
    "build_train_loader",
    "collate_segmentation",
    "sample_seed",
    "seed_worker",
]

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of the stream of run ``seed``
    (splitmix64 of the pair, so neighbouring positions get unrelated seeds)."""
    x = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (position & _MASK64)) & _MASK64
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class InfiniteSampler(Sampler[int]):
    """Indices of ``range(dataset_size)`` forever; this rank's strided share of the global
    stream (a fresh permutation seeded by ``seed + pass`` per pass, or the identity order
    without ``shuffle``). ``start=k`` skips the first ``k`` indices of this rank."""

    def __init__(
        self,
        dataset_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ):
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be positive, got {dataset_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        _check_rank(rank, world_size)
        self.dataset_size = dataset_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=g)

    def positioned(self) -> Iterator[tuple[int, int]]:
        """``(index, global position)`` pairs of this rank, from ``start`` on."""
        n, step = self.dataset_size, self.world_size
        pos = self.rank + self.start * step
        while True:
            epoch, offset = divmod(pos, n)
            chunk = self._order(epoch)[offset::step].tolist()
            for i, index in enumerate(chunk):
                yield index, pos + i * step
            pos += len(chunk) * step

    def __iter__(self) -> Iterator[int]:
        for index, _ in self.positioned():
            yield index


class SeededSampler(Sampler[tuple[int, int]]):
    """Wraps an :class:`InfiniteSampler` to yield ``(index, augmentation seed)`` pairs, the
    seed being :func:`sample_seed` of (``sampler.seed``, global position)."""

    def __init__(self, sampler: InfiniteSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed = self.sampler.seed
        for index, pos in self.sampler.positioned():
            yield index, sample_seed(seed, pos)


class ShardedSampler(Sampler[int]):
    """Rank ``rank``'s contiguous, unpadded shard of ``range(dataset_size)`` for evaluation:
    shard sizes differ by at most one and every index belongs to exactly one rank."""

    def __init__(self, dataset_size: int, rank: int = 0, world_size: int = 1):
        if dataset_size < 0:
            raise ValueError(f"dataset_size must be >= 0, got {dataset_size}")
        _check_rank(rank, world_size)
        self.begin = dataset_size * rank // world_size
        self.end = dataset_size * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


def collate_segmentation(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of a list of items (``image`` → B×3×H×W, ``target`` → B×H×W, ...)
    and gather everything else (``name``, ``ori_size``) into lists."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot batch {key!r} tensors of different shapes {sorted(shapes)}; "
                    "use batch size 1 or a pipeline that crops/pads to one size"
                )
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's and NumPy's generators from the worker's torch seed
    (which DataLoader derives from its ``generator``)."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    collate_fn: Any = collate_segmentation,
) -> DataLoader:
    """An endless loader of training batches for this rank (drop-last batches of
    ``batch_size``). With ``start_iter`` it yields the batches a run started at iteration 0
    would have yielded from iteration ``start_iter`` on (same indices, same augmentation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sampler = InfiniteSampler(
        len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size,
        start=start_iter * batch_size,
    )
    generator = torch.Generator()
    generator.manual_seed(seed * 1000 + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededSampler(sampler),
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )


def build_test_loader(
    dataset: Dataset, rank: int = 0, world_size: int = 1, num_workers: int = 0,
    collate_fn: Any = collate_segmentation,
) -> DataLoader:
    """Batch-size-1 loader over this rank's :class:`ShardedSampler` shard."""
    generator = torch.Generator()
    generator.manual_seed(rank)
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=ShardedSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
        generator=generator,
    )
