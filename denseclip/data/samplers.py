"""Samplers and data loaders for iteration-based training and sharded evaluation.

Training draws from one infinite *global* stream of dataset indices: the concatenation of
permutations ``perm(seed + 0), perm(seed + 1), ...`` (one per pass over the data). Rank ``r``
of ``world_size`` takes global positions ``r, r + world_size, r + 2·world_size, ...``, so
ranks never draw the same position and a resumed run continues the very same stream.

Detection training groups images by aspect ratio instead (:class:`GroupedInfiniteSampler`,
mmdet 2.17's ``DistributedGroupSampler``): every batch holds only landscape (flag 1,
width > height) or only portrait/square (flag 0) images. Per pass (mmdet's epoch) ``e`` a
``torch.Generator`` seeded with ``seed + e`` draws, in this order,

1. for each flag with images (0, then 1), a permutation of that flag's indices, padded by
   repeating it from its start to a multiple of ``batch_size × world_size``;
2. a permutation of the batches of ``batch_size`` consecutive indices of the concatenation;

and rank ``r`` takes the ``r``-th contiguous block of ``num_samples`` = total / world_size
indices (whole batches). Each rank's stream is its blocks of passes 0, 1, 2, ... So what a
rank gets for a pass given (world size, batch size, seed, pass) is exactly mmdet's
``DistributedGroupSampler`` with ``set_epoch(pass)``; ranks are disjoint within a pass
except for the padding repeats. In a single process mmdet uses the non-distributed
``GroupSampler``, which draws from NumPy's global generator (unseeded by the sampler) and
pads with random picks instead; ours runs the distributed algorithm with one replica there
too, so a single-process run is seeded and reproducible (and equals a one-GPU distributed
mmdet run), not mmdet's global-RNG draw.

The training loader hands the dataset ``(index, seed)`` pairs whose seed is a hash of
(run seed, global position): the augmentation of every draw is fixed by the run seed and
the draw's place in the stream, whatever the number of workers, and is reproduced exactly
after a resume from ``start_iter``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "GroupedInfiniteSampler",
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


class _Stream(Sampler[int]):
    """What both endless samplers share: the run's seed, this rank among ``world_size``
    and ``start``, how many of this rank's indices to skip (resuming)."""

    def __init__(self, seed: int, rank: int, world_size: int, start: int) -> None:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        _check_rank(rank, world_size)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start


class InfiniteSampler(_Stream):
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
        super().__init__(seed, rank, world_size, start)
        self.dataset_size = dataset_size
        self.shuffle = shuffle

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


class GroupedInfiniteSampler(_Stream):
    """mmdet's ``DistributedGroupSampler`` as an endless, resumable stream (the algorithm is
    in the module docstring): batches of ``batch_size`` consecutive indices share one
    ``flags`` value; this rank's block of pass ``e`` is :meth:`epoch_indices`. ``start=k``
    skips the first ``k`` indices of this rank (a multiple of ``batch_size`` keeps batches
    aligned).

    Args:
        flags: per dataset index its group (mmdet: 1 for width > height, else 0).
        batch_size: samples per process and batch (mmdet's ``samples_per_gpu``).
        seed, rank, world_size, start: as for :class:`InfiniteSampler`.
    """

    def __init__(self, flags: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        flag_array = np.asarray(list(flags), dtype=np.int64)
        if flag_array.ndim != 1 or flag_array.size == 0:
            raise ValueError("flags must be a non-empty sequence, one group id per sample")
        if int(flag_array.min()) < 0:
            raise ValueError(f"group flags must be >= 0, got {int(flag_array.min())}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        super().__init__(seed, rank, world_size, start)
        self.batch_size = batch_size
        # members of each non-empty group, in index order (mmdet: np.where(flag == i))
        self.groups = [np.flatnonzero(flag_array == g)
                       for g in range(int(flag_array.max()) + 1)]
        self.groups = [m for m in self.groups if m.size]
        chunk = batch_size * world_size
        self.total_size = sum(math.ceil(m.size / chunk) * chunk for m in self.groups)
        self.num_samples = self.total_size // world_size  # per rank and pass

    def epoch_order(self, epoch: int) -> list[int]:
        """All ranks' indices of pass ``epoch`` (``total_size`` of them), rank ``r``'s block
        being ``[r · num_samples, (r + 1) · num_samples)``."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        chunk = self.batch_size * self.world_size
        parts = []
        for members in self.groups:
            shuffled = members[torch.randperm(members.size, generator=g).numpy()]
            padded_size = math.ceil(members.size / chunk) * chunk
            repeats = math.ceil(padded_size / members.size)
            parts.append(np.tile(shuffled, repeats)[:padded_size])
        batches = np.concatenate(parts).reshape(-1, self.batch_size)
        order = torch.randperm(batches.shape[0], generator=g).numpy()
        return batches[order].reshape(-1).tolist()

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's ``num_samples`` indices of pass ``epoch``."""
        begin = self.rank * self.num_samples
        return self.epoch_order(epoch)[begin:begin + self.num_samples]

    def positioned(self) -> Iterator[tuple[int, int]]:
        """``(index, global position)`` pairs of this rank from ``start`` on; the global
        position of offset ``o`` of pass ``e`` is ``e · total_size + rank · num_samples + o``
        (unique across ranks and passes, for the augmentation seeds)."""
        epoch, offset = divmod(self.start, self.num_samples)
        while True:
            base = epoch * self.total_size + self.rank * self.num_samples
            block = self.epoch_indices(epoch)
            for o in range(offset, self.num_samples):
                yield block[o], base + o
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        for index, _ in self.positioned():
            yield index


class SeededSampler(Sampler[tuple[int, int]]):
    """Wraps an :class:`InfiniteSampler` or :class:`GroupedInfiniteSampler` to yield
    ``(index, augmentation seed)`` pairs, the seed being :func:`sample_seed` of
    (``sampler.seed``, global position)."""

    def __init__(self, sampler: InfiniteSampler | GroupedInfiniteSampler):
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
    group_flags: Sequence[int] | None = None,
) -> DataLoader:
    """An endless loader of training batches for this rank (drop-last batches of
    ``batch_size``). With ``start_iter`` it yields the batches a run started at iteration 0
    would have yielded from iteration ``start_iter`` on (same indices, same augmentation).
    With ``group_flags`` (one per dataset item, e.g. ``CocoDetection.aspect_ratio_flags``)
    batches are grouped by flag (:class:`GroupedInfiniteSampler`, mmdet's group sampler);
    without, the indices come from :class:`InfiniteSampler`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sampler: InfiniteSampler | GroupedInfiniteSampler
    if group_flags is None:
        sampler = InfiniteSampler(
            len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size,
            start=start_iter * batch_size,
        )
    else:
        if len(group_flags) != len(dataset):
            raise ValueError(f"{len(group_flags)} group flags for {len(dataset)} samples")
        sampler = GroupedInfiniteSampler(group_flags, batch_size, seed=seed, rank=rank,
                                         world_size=world_size, start=start_iter * batch_size)
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
