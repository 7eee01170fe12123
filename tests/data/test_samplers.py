from __future__ import annotations

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
