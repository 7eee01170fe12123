"""AdamW with per-group multipliers and the poly / step schedules with linear warm-up."""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from ..config import OptimConfig, ScheduleConfig

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split by (learning-rate, weight-decay) multipliers: the
    backbone gets ``backbone_lr_mult``, parameters of norm layers ``norm_decay_mult``.
    Frozen parameters (the text encoder) are left out."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES)
                   for p in m.parameters(recurse=False)}
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")
        lr_mult = cfg.backbone_lr_mult if name.startswith("backbone.") else 1.0
        decay_mult = cfg.norm_decay_mult if id(p) in norm_params else 1.0
        group = groups.setdefault((lr_mult, decay_mult), {
            "params": [], "names": [], "lr": cfg.lr * lr_mult,
            "weight_decay": cfg.weight_decay * decay_mult,
        })
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        g.pop("names")
    return AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _warmup(lr: float, it: int, cfg: ScheduleConfig) -> float:
    """mmcv's linear warm-up: from ``warmup_ratio``·lr at step 0 to lr at ``warmup_iters``."""
    if it < cfg.warmup_iters:
        k = (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        lr *= 1 - k
    return lr


def poly_lr(base_lr: float, it: int, cfg: ScheduleConfig) -> float:
    """mmcv's poly schedule with linear warm-up: the learning rate of step ``it``."""
    progress = min(it, cfg.max_iters) / cfg.max_iters
    lr = (base_lr - cfg.min_lr) * (1 - progress) ** cfg.power + cfg.min_lr
    return _warmup(lr, it, cfg)


def step_lr(base_lr: float, it: int, cfg: ScheduleConfig, iters_per_epoch: int) -> float:
    """Step schedule with linear warm-up: ×``step_gamma`` at the start of each epoch in
    ``steps`` (epochs counted from 0, so ``steps: [8, 11]`` changes the lr after 8 and 11
    epochs)."""
    epoch = it // max(1, iters_per_epoch)
    lr = base_lr * cfg.step_gamma ** sum(epoch >= s for s in cfg.steps)
    return _warmup(lr, it, cfg)


def build_scheduler(optimizer: AdamW, cfg: ScheduleConfig, iters_per_epoch: int = 1) -> LambdaLR:
    """Per-group factors so that each group follows :func:`poly_lr` (or :func:`step_lr`) of
    its own base lr (``min_lr`` is absolute, as in mmcv)."""
    if cfg.policy == "poly":
        def lr_at(base: float, it: int) -> float:
            return poly_lr(base, it, cfg)
    elif cfg.policy == "step":
        def lr_at(base: float, it: int) -> float:
            return step_lr(base, it, cfg, iters_per_epoch)
    else:
        raise ValueError(f"schedule.policy must be 'poly' or 'step', got {cfg.policy!r}")
    lambdas = [
        (lambda it, base=g["lr"]: lr_at(base, it) / base) for g in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lambdas)
