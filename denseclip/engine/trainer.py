"""Iteration-based training of every task (segmentation, RetinaNet, Mask R-CNN), on one
process or under torchrun; what differs between tasks lives in :mod:`.tasks`.

Order of one step: draw a batch → forward under autocast → (non-finite check) → backward
(scaled for fp16), repeated ``optim.accumulate`` times → optional gradient clipping →
optimiser step → scheduler step. Checkpoints are written atomically every
``schedule.checkpoint_interval`` iterations and at the end; ``resume`` continues from the
newest one in the work dir with the same data stream, RNG states and optimiser state.

The guards of :mod:`.guard` surround a run: one training per work dir (a lock), stale
temporaries of interrupted writes removed, a graceful stop with a checkpoint on SIGTERM /
SIGINT / SIGUSR1, ``schedule.keep_checkpoints`` retention, and only harmless settings
changed on resume.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..config import Config, ConfigError, config_from_dict, save_config
from ..data.samplers import build_train_loader
from ..dist import DistEnv, barrier, init_distributed
from ..runtime import prepare_model, run_mode
from ..tasks import build_model, get_task
from ..utils import unwrap_model
from ..weights.checkpoint import (
    TEXT_PREFIX,
    load_checkpoint,
    load_checkpoint_object,
    load_text_weights,
    read_checkpoint,
    save_checkpoint,
)
from .guard import (
    CKPT_PATTERN,
    GracefulStop,
    TrainingStopped,
    lock_work_dir,
    prune_checkpoints,
    remove_stale_temporaries,
    resume_config,
)
from .optim import build_optimizer, build_scheduler, freeze_text_encoder

_log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def newest_checkpoint(work_dir: Path) -> Path | None:
    """The ``iter_N.pth`` in ``work_dir`` with the largest N, if any."""
    found = [(int(m[1]), p) for p in Path(work_dir).glob("iter_*.pth")
             if (m := CKPT_PATTERN.match(p.name))]
    return max(found)[1] if found else None


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),  # Mersenne state as ints (weights-only safe)
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class MetricLogger:
    """JSON-lines file plus TensorBoard event files (main process only)."""

    def __init__(self, work_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        if enabled:
            self.file = open(work_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self.tb = SummaryWriter(str(work_dir / "tb"))

    def log(self, step: int, mode: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"mode": mode, "iter": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{mode}/{key}", value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _train_mode(cfg: Config, device: torch.device):
    """Autocast to ``cfg.amp`` with ``cfg.kernels`` in effect, around each training forward."""
    return run_mode("fp32" if cfg.amp == "none" else cfg.amp, cfg.kernels, device)


def iterations_per_epoch(dataset_size: int, cfg: Config, world_size: int,
                         group_flags: list[int] | None = None) -> int:
    """Optimiser steps in one pass over the training set (epoch-based schedules). With
    aspect-ratio groups, a pass is mmdet's: each group padded to whole global batches."""
    batch = cfg.data.batch_size * world_size
    samples = dataset_size
    if group_flags is not None:
        sizes = [group_flags.count(flag) for flag in set(group_flags)]
        samples = sum(math.ceil(n / batch) * batch for n in sizes)
    return max(1, math.ceil(samples / (batch * max(1, cfg.optim.accumulate))))


def train(cfg: Config, work_dir: str | Path, resume: bool = False,
          load_from: str | None = None, env: DistEnv | None = None,
          progress: bool = True, text_weights: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` in ``work_dir``; returns the last evaluation's metrics (if any).

    ``load_from`` initialises the weights from any checkpoint :func:`load_checkpoint`
    accepts (OpenAI CLIP, ImageNet torchvision/timm state dicts, releases, ours);
    ``text_weights`` then loads only the text tower from an OpenAI CLIP file
    (:func:`load_text_weights`), for backbones that are not CLIP's. Neither applies when
    resuming, whose checkpoint holds every weight; a resumed run may change only the
    settings of :data:`~.guard.RESUMABLE` (``cfg`` against the checkpoint's config).

    Only one training runs in a work dir at a time (``WorkDirBusyError`` otherwise).
    SIGTERM, SIGINT and SIGUSR1 stop the run after the current iteration with a checkpoint
    and raise :class:`~.guard.TrainingStopped`; the previous handlers are restored after."""
    env = env or init_distributed()
    work_dir = Path(work_dir)
    if cfg.schedule.max_epochs <= 0 and cfg.schedule.max_iters < 1:
        raise ConfigError(f"schedule.max_iters must be at least 1, got "
                          f"{cfg.schedule.max_iters}")
    if env.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    with ExitStack() as stack:
        stack.enter_context(lock_work_dir(work_dir, env))
        if env.is_main:
            removed = remove_stale_temporaries(work_dir)
            if removed:
                _log.info("removed %d temporary file(s) of interrupted checkpoint writes: %s",
                          len(removed), ", ".join(p.name for p in removed))
        stop = stack.enter_context(GracefulStop(announce=env.is_main))
        return _train(cfg, work_dir, resume, load_from, env, progress, text_weights, stop)


def _train(cfg: Config, work_dir: Path, resume: bool, load_from: str | None, env: DistEnv,
           progress: bool, text_weights: str | None, stop: GracefulStop) -> dict[str, Any]:
    log = _log.info if env.is_main else (lambda *a, **k: None)
    start_ckpt = newest_checkpoint(work_dir) if resume else None
    if resume and start_ckpt is None:
        log(f"no checkpoint to resume from in {work_dir}: starting at iteration 0")
    state: dict[str, Any] = {}
    if start_ckpt is not None:
        state = read_checkpoint(start_ckpt)
        if "config" in state:
            saved = config_from_dict(state["config"], str(start_ckpt))
            cfg, applied = resume_config(saved, cfg, str(start_ckpt))
            if applied:
                log("resuming with changed settings: " + ", ".join(applied))

    seed_everything(cfg.seed + env.rank)
    model = build_model(cfg).train()  # a model that cannot train says so before any data
    text_loaded = False
    if load_from and start_ckpt is None:
        report = load_checkpoint(model, load_from)
        log(str(report))
        text_loaded = any(k.startswith(TEXT_PREFIX) for k in report.loaded)
    if text_weights and start_ckpt is None:
        log(str(load_text_weights(model, text_weights)))
        text_loaded = True
    if (start_ckpt is None and not text_loaded and env.is_main
            and getattr(model, "guidance", None) is not None
            and cfg.model.backbone.type in ("torchvision", "timm")):
        _log.warning("the text encoder is left at random initialisation: load CLIP's text "
                     "tower with --text-weights (e.g. RN50.pt)")

    task = get_task(cfg)
    train_set = task.dataset(cfg.data.train_split, train=True)
    val_set = task.dataset(cfg.data.val_split, train=False) if cfg.schedule.eval_interval else None
    group_flags = task.group_flags(train_set)
    ipe = iterations_per_epoch(len(train_set), cfg, env.world_size, group_flags)
    if cfg.schedule.max_epochs > 0:
        cfg.schedule.max_iters = cfg.schedule.max_epochs * ipe
    if start_ckpt is not None:
        done, max_iters = int(state["iteration"]), cfg.schedule.max_iters
        if done > max_iters:
            raise ConfigError(f"{start_ckpt} is at iteration {done}, beyond schedule.max_iters "
                              f"{max_iters}: resume with schedule.max_iters >= {done}")
        if done == max_iters:
            log(f"{start_ckpt} is at iteration {done} = schedule.max_iters: training is "
                f"already complete, nothing to do (set a larger schedule.max_iters to train "
                f"longer)")
            return {}

    prepare_model(model.to(env.device), cfg.kernels)
    if env.distributed and env.device.type == "cuda":  # SyncBatchNorm needs CUDA
        model = task.convert_sync_batchnorm(model)
    if cfg.optim.freeze_text_encoder:
        freeze_text_encoder(model)
    optimizer = build_optimizer(model, cfg.optim, fused=cfg.kernels == "fast")
    scheduler = build_scheduler(optimizer, cfg.schedule, ipe)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.amp == "fp16")
    start_iter = 0
    if start_ckpt is not None:
        load_checkpoint_object(model, state, start_ckpt)  # read once above
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_iter = int(state["iteration"])
        ranks = state["rng"]
        set_rng_state(ranks[env.rank] if env.rank < len(ranks) else ranks[0])
        log(f"resumed from {start_ckpt} at iteration {start_iter}")
    del state

    if env.distributed:
        ids = [env.local_rank] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    # The training forward, compiled when asked (parameters shared with `model`, which
    # evaluation and checkpoints use as they are).
    forward = torch.compile(model, backend=cfg.compile_backend) if cfg.compile else model
    if env.is_main:
        save_config(cfg, work_dir / "config.yaml")

    accumulate = max(1, cfg.optim.accumulate)
    loader = iter(_train_loader(cfg, train_set, env, start_iter, task.collate, group_flags))
    effective = cfg.data.batch_size * env.world_size * accumulate
    log(f"training {cfg.name}: {len(train_set)} images, {ipe} iterations per epoch, "
        f"effective batch {effective} = {cfg.data.batch_size} per process x {env.world_size} "
        f"process(es) x {accumulate} accumulation step(s) (the official recipe uses "
        f"{task.official_batch_size})")
    meta = task.checkpoint_meta(train_set)

    logger = MetricLogger(work_dir, env.is_main)
    max_iters = cfg.schedule.max_iters
    last_metrics: dict[str, Any] = {}
    bar = tqdm(total=max_iters, initial=start_iter, desc="train", dynamic_ncols=True,
               disable=not (progress and env.is_main))
    model.train()
    tick = time.perf_counter()
    try:
        for it in range(start_iter, max_iters):
            optimizer.zero_grad(set_to_none=True)
            values: dict[str, float] = {}
            skipped = False
            for micro in range(accumulate):
                inputs, targets = task.to_device(next(loader), env.device)
                sync = micro == accumulate - 1 or not env.distributed
                ctx = nullcontext() if sync else model.no_sync()
                with ctx:
                    with _train_mode(cfg, env.device):
                        losses = forward(inputs, targets)
                    loss = sum(losses.values())
                    if not torch.isfinite(loss.detach()):
                        if cfg.nonfinite_loss == "skip":
                            log(f"\niteration {it + 1}: non-finite loss "
                                f"{ {k: v.item() for k, v in losses.items()} }, step skipped")
                            skipped = True
                            break
                        raise NonFiniteLossError(
                            f"iteration {it + 1}: the loss is not finite "
                            f"({ {k: v.item() for k, v in losses.items()} }); the last good "
                            f"checkpoint in {work_dir} is intact. Lower optim.lr, try amp=none, "
                            f"or set nonfinite_loss=skip"
                        )
                    scaler.scale(loss / accumulate).backward()
                for k, v in losses.items():
                    values[k] = values.get(k, 0.0) + v.item() / accumulate
            if skipped:
                optimizer.zero_grad(set_to_none=True)
            else:
                if cfg.optim.grad_clip:
                    scaler.unscale_(optimizer)
                    values["grad_norm"] = float(nn.utils.clip_grad_norm_(
                        model.parameters(), cfg.optim.grad_clip))
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            step = it + 1
            saved = None
            bar.update(1)
            if step % cfg.schedule.log_interval == 0 or step == max_iters:
                now = time.perf_counter()
                values["loss"] = sum(v for k, v in values.items() if k.startswith("loss"))
                values["lr"] = optimizer.param_groups[0]["lr"]
                values["sec_per_iter"] = (now - tick) / cfg.schedule.log_interval
                tick = now
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
                logger.log(step, "train", values)
            # every rank polls at the same points, so that all stop at the same step
            signum = stop.poll(env)
            if signum or step % cfg.schedule.checkpoint_interval == 0 or step == max_iters:
                saved = _save(work_dir / f"iter_{step}.pth", model, optimizer, scheduler,
                              scaler, step, cfg, env, meta)
            if not signum and val_set is not None and (step % cfg.schedule.eval_interval == 0
                                                       or step == max_iters):
                with run_mode("fp32", cfg.kernels, env.device):  # comparable across runs
                    last_metrics = task.evaluate(model, val_set, env, progress=progress)
                summary = {k: last_metrics[k] for k in task.summary_keys}
                log(f"\niteration {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                       summary.items()))
                logger.log(step, "val", summary)
                model.train()
                signum = stop.poll(env)  # a signal during a long evaluation
            if signum:
                if saved is None:
                    saved = _save(work_dir / f"iter_{step}.pth", model, optimizer, scheduler,
                                  scaler, step, cfg, env, meta)
                raise TrainingStopped(signum, saved, step)
    finally:
        bar.close()
        logger.close()
    return last_metrics


def _train_loader(cfg: Config, dataset, env: DistEnv, start_iter: int, collate,
                  group_flags=None):
    # Every process draws batch_size x accumulate samples per iteration.
    accumulate = max(1, cfg.optim.accumulate)
    return build_train_loader(dataset, cfg.data.batch_size, cfg.data.num_workers, cfg.seed,
                              env.rank, env.world_size, start_iter=start_iter * accumulate,
                              collate_fn=collate, group_flags=group_flags)


def _save(path: Path, model, optimizer, scheduler, scaler, step: int, cfg: Config,
          env: DistEnv, meta: dict[str, Any]) -> Path:
    """Gather every rank's RNG state, then write the checkpoint from the main process and
    apply ``schedule.keep_checkpoints``; returns ``path``."""
    states = [rng_state()]
    if env.distributed:
        states = [None] * env.world_size
        dist.all_gather_object(states, rng_state())
    if env.is_main:
        save_checkpoint(path, unwrap_model(model), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                        iteration=step, rng=states, config=cfg.to_dict(), **meta)
        prune_checkpoints(path.parent, cfg.schedule.keep_checkpoints)
    barrier()
    return path


def test(cfg: Config, checkpoint: str | Path, aug_test: bool = False,
         out_dir: str | Path | None = None, env: DistEnv | None = None,
         progress: bool = True, precision: str = "fp32") -> dict[str, Any]:
    """Evaluate ``checkpoint`` (any format :func:`load_checkpoint` accepts) on the
    validation split of ``cfg.data``: mIoU for segmentation, COCO AP for detection.

    ``precision`` is the inference precision (``fp32`` by default, so that reproduced
    numbers are reproducible; ``auto``/``bf16``/``fp16`` as in :mod:`denseclip.runtime`);
    the result's ``precision`` says which one ran.

    With ``out_dir``, the evaluation writes its files there (segmentation: label PNGs,
    ``metrics.json``, ``confusion_matrix.npy``; detection: ``bbox.json``/``segm.json``,
    ``metrics.json``, ``per_category_ap.json``/``.md``) and the main process adds the
    task's figures (segmentation: ``plots/confusion_matrix.png`` and
    ``plots/per_class_iou.png``, which need matplotlib)."""
    env = env or init_distributed()
    model = build_model(cfg)
    report = load_checkpoint(model, checkpoint)
    if env.is_main:
        _log.info("%s", report)
    prepare_model(model.to(env.device), cfg.kernels).eval()
    task = get_task(cfg)
    dataset = task.dataset(cfg.data.val_split, train=False)
    with run_mode(precision, cfg.kernels, env.device) as resolved:
        metrics = task.evaluate(model, dataset, env, aug_test=aug_test, out_dir=out_dir,
                                progress=progress)
    metrics["summary"] = {k: metrics[k] for k in task.summary_keys}
    metrics["precision"] = resolved
    if out_dir is not None and env.is_main:
        figures = task.write_figures(metrics, out_dir)
        if figures:
            _log.info("figures: %s", ", ".join(str(p) for p in figures))
    return metrics
