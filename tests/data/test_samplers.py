from __future__ import annotations

import math
from collections import Counter
from itertools import islice

import pytest
import torch
from torch.utils.data import Dataset

from denseclip.config import DataConfig
from denseclip.data import (
    InfiniteSampler,
    ShardedSampler,
    build_segmentation_dataset,
    build_test_loader,
    build_train_loader,
    collate_segmentation,
    sample_seed,
)
from denseclip.data.samplers import GroupedInfiniteSampler


def _take(sampler, n):
    return list(islice(iter(sampler), n))


def test_infinite_sampler_passes_are_fresh_seeded_permutations():
    stream = _take(InfiniteSampler(10, seed=3), 40)
    passes = [stream[i : i + 10] for i in range(0, 40, 10)]
    for p in passes:
        assert sorted(p) == list(range(10))
    assert len({tuple(p) for p in passes}) == 4
    assert passes[1] == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    assert stream == _take(InfiniteSampler(10, seed=3), 40)
    assert stream != _take(InfiniteSampler(10, seed=4), 40)
    assert _take(InfiniteSampler(4, shuffle=False), 9) == [0, 1, 2, 3, 0, 1, 2, 3, 0]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_strided_shares_of_one_global_stream(world_size):
    n = 7
    global_stream = _take(InfiniteSampler(n, seed=1), 6 * n)
    shares = [_take(InfiniteSampler(n, seed=1, rank=r, world_size=world_size), 2 * n)
              for r in range(world_size)]
    for r, share in enumerate(shares):
        assert share == global_stream[r::world_size][: 2 * n]
    # Interleaving the ranks rebuilds the global stream: each pass is used exactly once.
    first = [shares[i % world_size][i // world_size] for i in range(n)]
    assert sorted(first) == list(range(n))


@pytest.mark.parametrize(("rank", "world_size", "start"), [(0, 1, 0), (0, 1, 13), (1, 2, 9),
                                                           (2, 3, 5), (0, 3, 21)])
def test_start_offset_continues_the_same_stream(rank, world_size, start):
    full = InfiniteSampler(9, seed=2, rank=rank, world_size=world_size)
    resumed = InfiniteSampler(9, seed=2, rank=rank, world_size=world_size, start=start)
    assert _take(resumed, 30) == _take(full, start + 30)[start:]


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError):
        InfiniteSampler(0)
    with pytest.raises(ValueError):
        InfiniteSampler(5, rank=2, world_size=2)
    with pytest.raises(ValueError):
        ShardedSampler(5, rank=-1, world_size=2)


@pytest.mark.parametrize(("n", "world_size"), [(10, 1), (10, 3), (7, 4), (2, 5), (0, 2)])
def test_sharded_sampler_covers_every_index_exactly_once(n, world_size):
    shards = [list(ShardedSampler(n, r, world_size)) for r in range(world_size)]
    assert sum(shards, []) == list(range(n))  # contiguous, in order, unpadded
    sizes = [len(ShardedSampler(n, r, world_size)) for r in range(world_size)]
    assert sizes == [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_sample_seed_is_stable_and_spread():
    seeds = [sample_seed(0, p) for p in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 5) == sample_seed(0, 5) != sample_seed(1, 5)


def test_collate_stacks_tensors_and_lists_the_rest():
    items = [{"image": torch.zeros(3, 4, 5), "target": torch.ones(4, 5, dtype=torch.long),
              "name": f"n{i}", "ori_size": (4, 5)} for i in range(2)]
    batch = collate_segmentation(items)
    assert batch["image"].shape == (2, 3, 4, 5) and batch["target"].dtype == torch.int64
    assert batch["name"] == ["n0", "n1"] and batch["ori_size"] == [(4, 5), (4, 5)]
    items[1]["image"] = torch.zeros(3, 4, 6)
    with pytest.raises(ValueError, match="different shapes"):
        collate_segmentation(items)


class _Recorder(Dataset):
    """Returns the key it was asked for and a draw from the (seeded) torch generator."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, seed = key
        g = torch.Generator().manual_seed(seed)
        return {"index": torch.tensor(index), "noise": torch.rand(2, generator=g)}


def test_train_loader_resume_reproduces_indices_and_augmentation_seeds():
    ds = _Recorder(11)
    full = list(islice(iter(build_train_loader(ds, 3, 0, seed=5)), 8))
    resumed = list(islice(iter(build_train_loader(ds, 3, 0, seed=5, start_iter=5)), 3))
    for a, b in zip(full[5:], resumed, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["noise"], b["noise"])
    assert all(batch["index"].shape == (3,) for batch in full)
    # Two ranks draw disjoint positions of the same global stream.
    r0 = next(iter(build_train_loader(ds, 2, 0, seed=5, rank=0, world_size=2)))
    r1 = next(iter(build_train_loader(ds, 2, 0, seed=5, rank=1, world_size=2)))
    single = next(iter(build_train_loader(ds, 4, 0, seed=5)))
    assert r0["index"].tolist() == single["index"][0::2].tolist()
    assert r1["index"].tolist() == single["index"][1::2].tolist()
    assert torch.equal(r1["noise"], single["noise"][1::2])


@pytest.fixture
def small_cfg(colour_dataset):
    return DataConfig(root=str(colour_dataset), img_suffix=".png", scale=[64, 32],
                      crop_size=[24, 24], test_scale=[64, 32])


def test_train_loader_with_workers_matches_in_process_loading(small_cfg):
    ds = build_segmentation_dataset(small_cfg, "training", 7, train=True)
    in_process = list(islice(iter(build_train_loader(ds, 2, 0, seed=1)), 3))
    workers = list(islice(iter(build_train_loader(ds, 2, 2, seed=1)), 3))
    for a, b in zip(in_process, workers, strict=True):
        assert a["image"].shape == (2, 3, 24, 24) and a["target"].shape == (2, 24, 24)
        # Same crops, flips and colour jitter; only float rounding may differ with the
        # workers' single intra-op thread.
        assert torch.allclose(a["image"], b["image"], atol=1e-4)
        assert torch.equal(a["target"], b["target"]) and a["name"] == b["name"]


def test_test_loader_shards_see_every_image_once(small_cfg):
    ds = build_segmentation_dataset(small_cfg, "training", 7, train=False)
    names = Counter()
    for rank in range(3):
        for batch in build_test_loader(ds, rank, 3, num_workers=0):
            assert batch["image"].shape[0] == 1 and batch["image"].dtype == torch.float32
            assert batch["ori_target"].shape[1:] == tuple(batch["ori_size"][0])
            names.update(batch["name"])
    assert names == Counter(ds.names)


# ----------------------------------------------------------------------------- group sampler
def mmdet_distributed_group_epoch(flags, samples_per_gpu, num_replicas, rank, seed, epoch):
    """mmdet 2.17's DistributedGroupSampler.__iter__ after set_epoch(epoch), transcribed
    loop by loop from its documented algorithm (independently of the package)."""
    g = torch.Generator()
    g.manual_seed(epoch + seed)
    group_sizes = [flags.count(i) for i in range(max(flags) + 1)]
    num_samples = sum(math.ceil(size / samples_per_gpu / num_replicas) * samples_per_gpu
                      for size in group_sizes)
    indices = []
    for i, size in enumerate(group_sizes):
        if size == 0:
            continue
        members = [k for k, f in enumerate(flags) if f == i]
        perm = torch.randperm(size, generator=g).tolist()
        members = [members[p] for p in perm]
        extra = (math.ceil(size / samples_per_gpu / num_replicas) * samples_per_gpu
                 * num_replicas - size)
        padded = list(members)
        for _ in range(extra // size):
            padded.extend(members)
        padded.extend(members[: extra % size])
        indices.extend(padded)
    batch_order = torch.randperm(len(indices) // samples_per_gpu, generator=g).tolist()
    shuffled = []
    for b in batch_order:
        for j in range(b * samples_per_gpu, (b + 1) * samples_per_gpu):
            shuffled.append(indices[j])
    return shuffled[num_samples * rank: num_samples * (rank + 1)]


FLAGS = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1]  # 8 landscape, 3 portrait


@pytest.mark.parametrize(("flags", "spg", "world_size", "seed"), [
    (FLAGS, 2, 1, 0), (FLAGS, 2, 2, 7), (FLAGS, 3, 4, 1), ([0, 0, 0, 0, 0], 2, 3, 5),
    ([1] * 4 + [0] * 9, 4, 2, 42), ([1, 1, 1], 2, 2, 0),  # no portrait image at all
])
def test_group_sampler_epochs_equal_mmdets_distributed_group_sampler(flags, spg, world_size,
                                                                      seed):
    for rank in range(world_size):
        sampler = GroupedInfiniteSampler(flags, spg, seed=seed, rank=rank,
                                         world_size=world_size)
        for epoch in range(3):
            assert sampler.epoch_indices(epoch) == mmdet_distributed_group_epoch(
                flags, spg, world_size, rank, seed, epoch)
        # the stream is the rank's blocks of passes 0, 1, 2, ...
        n = sampler.num_samples
        stream = _take(sampler, 3 * n)
        assert stream == sum((sampler.epoch_indices(e) for e in range(3)), [])


@pytest.mark.parametrize(("spg", "world_size"), [(1, 1), (2, 1), (2, 2), (3, 3), (2, 4)])
def test_group_sampler_invariants(spg, world_size):
    samplers = [GroupedInfiniteSampler(FLAGS, spg, seed=3, rank=r, world_size=world_size)
                for r in range(world_size)]
    n = samplers[0].num_samples
    assert n % spg == 0 and samplers[0].total_size == n * world_size
    for epoch in range(4):
        blocks = [s.epoch_indices(epoch) for s in samplers]
        assert all(len(b) == n for b in blocks)
        for block in blocks:  # every batch holds one flag
            for start in range(0, n, spg):
                assert len({FLAGS[i] for i in block[start:start + spg]}) == 1
        union = sum(blocks, [])
        assert set(union) == set(range(len(FLAGS)))  # each pass covers every index
        # ranks are disjoint up to the padding repeats: only padded indices repeat, at most
        # as often as the padding of their group requires
        counts = Counter(union)
        for flag in (0, 1):
            size = FLAGS.count(flag)
            padded = math.ceil(size / (spg * world_size)) * spg * world_size
            assert sum(c for i, c in counts.items() if FLAGS[i] == flag) == padded
            assert max(c for i, c in counts.items() if FLAGS[i] == flag) == math.ceil(
                padded / size)
    # passes differ (fresh draws per epoch) and seeds matter
    assert samplers[0].epoch_order(0) != samplers[0].epoch_order(1)
    other = GroupedInfiniteSampler(FLAGS, spg, seed=4, world_size=world_size)
    assert other.epoch_order(0) != samplers[0].epoch_order(0)


@pytest.mark.parametrize(("rank", "world_size", "start"), [(0, 1, 0), (0, 1, 6), (1, 2, 4),
                                                           (2, 3, 14), (0, 2, 22)])
def test_group_sampler_resume_continues_the_same_stream(rank, world_size, start):
    full = GroupedInfiniteSampler(FLAGS, 2, seed=9, rank=rank, world_size=world_size)
    resumed = GroupedInfiniteSampler(FLAGS, 2, seed=9, rank=rank, world_size=world_size,
                                     start=start)
    assert _take(resumed, 30) == _take(full, start + 30)[start:]
    full_pos = list(islice(full.positioned(), start + 30))[start:]
    assert list(islice(resumed.positioned(), 30)) == full_pos


def test_group_sampler_positions_are_unique_across_ranks_and_passes():
    positions = [pos for r in range(3) for _, pos in
                 islice(GroupedInfiniteSampler(FLAGS, 2, rank=r, world_size=3).positioned(),
                        40)]
    assert len(set(positions)) == len(positions)


def test_group_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="non-empty"):
        GroupedInfiniteSampler([], 2)
    with pytest.raises(ValueError, match="batch_size"):
        GroupedInfiniteSampler([0, 1], 0)
    with pytest.raises(ValueError, match=">= 0"):
        GroupedInfiniteSampler([0, -1], 2)
    with pytest.raises(ValueError):
        GroupedInfiniteSampler([0, 1], 2, rank=1, world_size=1)
    with pytest.raises(ValueError, match="group flags for"):
        build_train_loader(_Recorder(3), 2, 0, seed=0, group_flags=[0, 1])


def test_train_loader_groups_batches_by_flag_and_resumes():
    ds = _Recorder(len(FLAGS))
    full = list(islice(iter(build_train_loader(ds, 2, 0, seed=5, group_flags=FLAGS)), 12))
    for batch in full:
        assert len({FLAGS[i] for i in batch["index"].tolist()}) == 1
    resumed = list(islice(iter(build_train_loader(ds, 2, 0, seed=5, start_iter=7,
                                                  group_flags=FLAGS)), 5))
    for a, b in zip(full[7:], resumed, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["noise"], b["noise"])
    sampler = build_train_loader(ds, 2, 0, seed=5, group_flags=FLAGS).sampler.sampler
    assert isinstance(sampler, GroupedInfiniteSampler)
    first_pass = sum((b["index"].tolist() for b in full[: sampler.num_samples // 2]), [])
    assert first_pass == sampler.epoch_indices(0)
