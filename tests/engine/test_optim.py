"""The optimiser and schedule against the official recipe: mmcv's ``custom_keys`` rule on
the official parameter names, the text encoder kept in the optimiser at lr ×0 (and its drift
under the absolute poly ``min_lr``), ``optim.freeze_text_encoder``, SyncBN scopes and the
ViT drop-path modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import denseclip
from denseclip.config import ScheduleConfig
from denseclip.engine.optim import (
    build_optimizer,
    build_scheduler,
    freeze_text_encoder,
    param_groups,
    poly_lr,
)
from denseclip.engine.trainer import iterations_per_epoch
from denseclip.models.layers import DropPath
from denseclip.models.official import invert_renames
from denseclip.tasks import DetectionTask, SegmentationTask
from denseclip.weights import rename_key

OFFICIAL_KEYS = Path(__file__).parents[1] / "fixtures" / "official_keys"
PRESETS = sorted(p.stem for p in OFFICIAL_KEYS.glob("*.txt"))
# The paramwise_cfg of every official config (DESIGN §7, §9).
OFFICIAL_CUSTOM_KEYS = {"backbone": (0.1, 1.0), "text_encoder": (0.0, 1.0), "norm": (1.0, 0.0)}


def official_keys(preset: str) -> list[str]:
    return [line.split("\t")[0] for line in (OFFICIAL_KEYS / f"{preset}.txt").read_text()
            .splitlines() if line.strip()]


def mmcv_rule(official_name: str) -> tuple[float, float]:
    """DefaultOptimizerConstructor.add_params, written out: longest key first (ties
    alphabetical), substring of ".name" for top-level parameters, first match wins."""
    keys = sorted(OFFICIAL_CUSTOM_KEYS, key=lambda k: (-len(k), k))
    probe = official_name if "." in official_name else f".{official_name}"
    for key in keys:
        if key in probe:
            return OFFICIAL_CUSTOM_KEYS[key]
    return (1.0, 1.0)


def meta_model(preset: str) -> tuple[denseclip.Config, nn.Module]:
    cfg = denseclip.load_config(preset)
    with torch.device("meta"):
        return cfg, denseclip.build_model(cfg)


@pytest.mark.parametrize("preset", PRESETS)
def test_multipliers_follow_the_official_rule_on_official_names(preset):
    cfg, model = meta_model(preset)
    groups = param_groups(model, cfg.optim)
    ours = {n: (g["lr"] / cfg.optim.lr, g["weight_decay"] / cfg.optim.weight_decay)
            for g in groups for n in g["names"]}
    params = dict(model.named_parameters())
    assert set(ours) == set(params)  # every parameter, the text encoder included
    table, inverse = model.official_renames, invert_renames(model.official_renames)
    checked = 0
    for key in official_keys(preset):
        name = rename_key(key, table)
        assert rename_key(name, inverse) == key  # the rename table runs both ways
        if name in params:
            assert ours[name] == pytest.approx(mmcv_rule(key)), key
            checked += 1
    assert checked == len(params)
    no_decay = sorted(n for n, (_, decay) in ours.items() if decay == 0)
    if "denseclip" in preset:  # only the context decoder layers' norm1/2/3
        assert len(no_decay) == 18
        assert all(n.startswith("guidance.context_decoder.decoder.") for n in no_decay)
    else:
        assert no_decay == []


def test_text_encoder_drifts_under_the_absolute_min_lr_unless_frozen():
    cfg = denseclip.load_config("tiny_denseclip_res", ["schedule.max_iters=100",
                                                      "schedule.warmup_iters=10"])
    model = denseclip.build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    text = next(g for g in optimizer.param_groups if g["initial_lr"] == 0.0)
    head = next(g for g in optimizer.param_groups if g["initial_lr"] == cfg.optim.lr)
    n_text = sum(p.numel() for p in model.guidance.text_encoder.parameters())
    assert sum(p.numel() for p in text["params"]) == n_text
    for it in range(1, 60):
        optimizer.step()
        scheduler.step()
        expected = 1e-6 * (1 - (1 - it / 100) ** 0.9)
        if it < 10:
            expected *= 1 - (1 - it / 10) * (1 - cfg.schedule.warmup_ratio)
        assert text["lr"] == pytest.approx(expected, rel=1e-9)
        assert text["lr"] > 0
        assert head["lr"] == pytest.approx(poly_lr(cfg.optim.lr, it, cfg.schedule), rel=1e-9)
    # the step policy has no min_lr: the text encoder's lr stays 0
    step = ScheduleConfig(policy="step", steps=[1], warmup_iters=2, max_iters=10)
    scheduler = build_scheduler(build_optimizer(model, cfg.optim), step, iters_per_epoch=3)
    for _ in range(5):
        scheduler.optimizer.step()
        scheduler.step()
    assert min(g["lr"] for g in scheduler.optimizer.param_groups) == 0.0
    # optim.freeze_text_encoder: out of the optimiser, no gradient
    freeze_text_encoder(model)
    names = {n for g in param_groups(model, cfg.optim) for n in g["names"]}
    assert not any(n.startswith("guidance.text_encoder.") for n in names)
    assert "guidance.contexts" in names


def test_scheduler_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    cfg = denseclip.load_config("tiny_denseclip_res")
    model = denseclip.build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    fresh = build_scheduler(build_optimizer(model, cfg.optim), cfg.schedule)
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    fresh.optimizer.step()
    fresh.step()
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [
        g["lr"] for g in optimizer.param_groups]


def test_sync_batchnorm_scope_follows_the_official_scripts():
    seg = denseclip.build_model(denseclip.load_config("tiny_denseclip_res"))
    seg = SegmentationTask.convert_sync_batchnorm(seg)
    assert isinstance(seg.backbone.bn1, nn.SyncBatchNorm)
    assert isinstance(seg.head.scale_heads[0][0].bn, nn.SyncBatchNorm)  # the head's too
    det = denseclip.build_model(denseclip.load_config("tiny_retinanet_denseclip"))
    det = DetectionTask.convert_sync_batchnorm(det)
    assert isinstance(det.backbone.bn1, nn.SyncBatchNorm)
    plain = [m for name, m in det.named_modules() if not name.startswith("backbone")
             and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain)


@pytest.mark.parametrize("mode", ["token", "sample"])
def test_drop_path_masks_token_positions_or_samples(mode):
    drop = DropPath(0.5, mode).train()
    torch.manual_seed(0)
    out = drop(torch.ones(64, 8, 4))  # (L, B, C), sequence-first as the ViT blocks run
    kept = out[:, :, 0] > 0  # (L, B)
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    if mode == "token":  # one draw per position, shared by the whole batch
        assert (kept == kept[:, :1]).all() and 0 < kept[:, 0].sum() < 64
    else:  # one draw per image, shared by all positions
        assert (kept == kept[:1]).all() and 0 < kept[0].sum() < 8
    cfg = denseclip.load_config("denseclip_fpn_vit-b_640x640_80k")
    assert cfg.model.backbone.drop_path_mode == "token"  # official default


def test_an_epoch_of_aspect_ratio_groups_is_mmdets():
    # mmdet pads each group to whole global batches: 5 landscape + 3 portrait images at
    # batch 2 make 3 + 2 batches, one more than the 4 of a plain pass.
    cfg = denseclip.load_config("tiny_retinanet_denseclip", ["data.batch_size=2"])
    flags = [1, 1, 1, 1, 1, 0, 0, 0]
    assert iterations_per_epoch(8, cfg, 1) == 4
    assert iterations_per_epoch(8, cfg, 1, flags) == 5
    assert iterations_per_epoch(8, cfg, 2, flags) == 3  # global batch 4: 2 + 1 batches


def test_fused_adamw_gives_the_default_update():
    """``kernels: fast`` trains with the fused AdamW kernel: the same parameters after a
    few steps (every multiplier group, decay on and off) up to float rounding."""
    cfg = denseclip.load_config("tiny_denseclip_res")
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = denseclip.build_model(cfg)
        optimizer = build_optimizer(model, cfg.optim, fused=fused)
        assert optimizer.defaults["fused"] is (True if fused else None)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            optimizer.zero_grad()
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        models.append(model)
    reference, fused = (dict(m.named_parameters()) for m in models)
    for name, p in reference.items():
        torch.testing.assert_close(fused[name], p, rtol=1e-5, atol=1e-6, msg=name)
    # the comparison is not vacuous: the steps changed the weights
    torch.manual_seed(0)
    initial = dict(denseclip.build_model(cfg).named_parameters())
    moved = sum(not torch.equal(initial[n], p) for n, p in reference.items())
    assert moved > len(reference) // 2
