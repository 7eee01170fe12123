"""Iteration-based training of every task (segmentation, RetinaNet, Mask R-CNN), on one
process or under torchrun; what differs between tasks lives in :mod:`denseclip.tasks`.

:class:`Trainer` holds a run; its loop is ``before_train`` → per step ``before_step``,
:meth:`Trainer.run_step`, ``after_step`` → ``after_train``, with the hooks of :mod:`.hooks`
(logging, checkpoints, evaluation, and any added) at those points. Order of one step: draw
a batch → forward under autocast → (non-finite check) → backward (scaled for fp16),
repeated ``optim.accumulate`` times → optional gradient clipping → optimiser step →
scheduler step. Checkpoints are written atomically every ``schedule.checkpoint_interval``
iterations and at the end; ``resume`` continues from the newest one in the work dir with
the same data stream, RNG states and optimiser state. With evaluation, ``best.pth`` keeps
the weights of the best evaluation by the task's main metric; a finished run writes
``work_dir/model/`` (``schedule.save_model``); the records of ``metrics.jsonl`` also go to
the trackers of ``log.backends`` (:mod:`.trackers`).

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
import warnings
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import Config, ConfigError, config_from_dict, save_config
from ..data.samplers import build_train_loader
from ..dist import DistEnv, barrier, init_distributed
from ..inference.int8 import Calibration, quantize_model
from ..models.build import fit_text_context
from ..runtime import prepare_model, resolve_precision, run_mode
from ..tasks import build_model, get_task
from ..utils import unwrap_model
from ..weights.checkpoint import (
    TEXT_PREFIX,
    CheckpointError,
    load_checkpoint,
    load_checkpoint_object,
    load_text_weights,
    read_checkpoint,
    save_checkpoint,
)
from ..weights.pretrained import class_texts_meta
from ..weights.provenance import (
    UntrainedPartsWarning,
    loaded_parts,
    provenance_record,
    untrained_message,
)
from ..weights.resolver import newest_checkpoint
from .guard import (
    GracefulStop,
    TrainingStopped,
    lock_work_dir,
    prune_checkpoints,
    remove_stale_temporaries,
    resume_config,
)
from .hooks import (
    BestCheckpointHook,
    CheckpointHook,
    EvalHook,
    HookBase,
    LoggingHook,
    SaveModelHook,
)
from .optim import build_optimizer, build_scheduler, freeze_text_encoder, param_groups
from .trackers import Tracker, build_trackers

_log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


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
    """The JSON-lines file ``metrics.jsonl``, each record also handed to ``trackers``
    (:mod:`.trackers`: TensorBoard, MLflow, W&B) (main process only)."""

    def __init__(self, work_dir: Path, enabled: bool, trackers: Sequence[Tracker] = ()) -> None:
        self.enabled = enabled
        self.trackers = list(trackers)
        self.file = None
        if enabled:
            self.file = open(work_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, mode: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"mode": mode, "iter": step, **values}) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.log_metrics(step, mode, values)

    def close(self) -> None:
        """Close the file, and any tracker still open (after a failure) as failed."""
        if self.file:
            self.file.close()
        for tracker in self.trackers:
            tracker.close()


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


# what a checkpoint needs to be resumed from (besides the weights)
RESUME_STATE = ("iteration", "optimizer", "scheduler", "scaler", "rng")


class Trainer:
    """One training run: the model, optimiser, schedule, grad scaler, data stream and task,
    the step counter ``iteration``, and the hooks of :mod:`.hooks` around each step.

    The constructor builds the run in the order that fixes every random draw: resume point
    → seed → model → initial weights → data → optimisation → resumed state → data stream.
    A run resumed at ``schedule.max_iters`` builds nothing past the data and sets
    ``complete``. :meth:`train` runs the loop; :meth:`run_step` is one optimiser step.
    ``stop`` (a :class:`~.guard.GracefulStop`) turns signals into a stop after the step;
    :func:`train` builds one inside the work-dir lock and the graceful stop."""

    def __init__(self, cfg: Config, work_dir: str | Path, env: DistEnv, *, resume: bool = False,
                 load_from: str | None = None, text_weights: str | None = None,
                 progress: bool = True, stop: GracefulStop | None = None) -> None:
        self.work_dir, self.env, self.progress, self.stop = Path(work_dir), env, progress, stop
        self.hooks: list[HookBase] = []
        self.iteration = 0
        self.values: dict[str, float] = {}  # the last step's mean losses (and grad_norm)
        self.last_metrics: dict[str, Any] = {}
        self.last_eval_iteration = -1
        self.stop_signal, self.stop_requested, self._saved_at = 0, False, -1
        self.writer: MetricLogger | None = None
        self.init_loaded: dict[str, str] | None = {}  # part → weights file (None: unknown)
        self.trackers: list[Tracker] = []  # log.backends, main process
        self.finished = False  # the loop ended without an error or a stop signal
        self.saved_model: Path | None = None  # work_dir/model, once written
        start, state = self._resume_point(cfg, resume)
        seed_everything(self.cfg.seed + env.rank)
        model = build_model(self.cfg).train()  # a model that cannot train says so before data
        if start is None:
            self._load_weights(model, load_from, text_weights)
        self._build_data()
        self.complete = start is not None and self._complete_at(start, int(state["iteration"]))
        if self.complete:
            return
        self._build_optimisation(model)
        if start is not None:
            self._restore(state, start)
        del state
        self._build_stream()
        self.register_hooks(self.default_hooks())

    # ------------------------------------------------------------------ building
    def _resume_point(self, cfg: Config, resume: bool) -> tuple[Path | None, dict[str, Any]]:
        """The newest checkpoint to resume (None: a new run) and its contents; ``self.cfg``
        becomes its config with the :data:`~.guard.RESUMABLE` changes of ``cfg``."""
        self.cfg = cfg
        start = newest_checkpoint(self.work_dir) if resume else None
        if resume and start is None:
            self.log(f"no checkpoint to resume from in {self.work_dir}: starting at iteration 0")
        if start is None:
            return None, {}
        state = read_checkpoint(start)
        missing = [k for k in RESUME_STATE if k not in state] if isinstance(state, dict) \
            else list(RESUME_STATE)
        if missing:
            raise CheckpointError(
                f"{start} is not a checkpoint of denseclip train (no {', '.join(missing)}), "
                f"so training cannot resume from it; move it out of {self.work_dir}, or start "
                f"a new run from its weights with --load-from {start}")
        stored = state.get("provenance")  # older checkpoints: unknown
        self.init_loaded = dict(stored["loaded"]) if isinstance(stored, dict) else None
        if "config" in state:
            saved = config_from_dict(state["config"], str(start))
            fit_text_context(cfg.model)  # as the saved config, which records a grown context
            self.cfg, applied = resume_config(saved, cfg, str(start))
            if applied:
                self.log("resuming with changed settings: " + ", ".join(applied))
        return start, state

    def _load_weights(self, model: nn.Module, load_from: str | None,
                      text_weights: str | None) -> None:
        """A new run's initial weights: ``load_from``, then CLIP's text tower from
        ``text_weights``; warns when an ImageNet backbone's text encoder stays random."""
        text_loaded = False
        reports = [r for r in (getattr(model, "pretrained_report", None),) if r is not None]
        if load_from:
            report = load_checkpoint(model, load_from)
            self.log(str(report))
            reports.append(report)
            text_loaded = any(k.startswith(TEXT_PREFIX) for k in report.loaded)
        if text_weights:
            reports.append(load_text_weights(model, text_weights))
            self.log(str(reports[-1]))
            text_loaded = True
        self.init_loaded = loaded_parts(reports)  # the checkpoints' "provenance"
        if (not text_loaded and self.env.is_main and getattr(model, "guidance", None) is not None
                and self.cfg.model.backbone.type in ("torchvision", "timm")):
            _log.warning("the text encoder is left at random initialisation: load CLIP's text "
                         "tower with --text-weights (e.g. RN50.pt)")

    def _build_data(self) -> None:
        """The task, its training (and validation) set and the schedule's length."""
        cfg = self.cfg
        self.task = get_task(cfg)
        self.train_set = self.task.dataset(cfg.data.train_split, train=True)
        self.val_set = (self.task.dataset(cfg.data.val_split, train=False)
                        if cfg.schedule.eval_interval else None)
        self.group_flags = self.task.group_flags(self.train_set)
        self.iters_per_epoch = iterations_per_epoch(len(self.train_set), cfg,
                                                    self.env.world_size, self.group_flags)
        if cfg.schedule.max_epochs > 0:
            cfg.schedule.max_iters = cfg.schedule.max_epochs * self.iters_per_epoch
        self.max_iters = cfg.schedule.max_iters

    def _complete_at(self, start: Path, done: int) -> bool:
        """Whether the checkpoint ``start``, at iteration ``done``, ends the schedule."""
        if done > self.max_iters:
            raise ConfigError(f"{start} is at iteration {done}, beyond schedule.max_iters "
                              f"{self.max_iters}: resume with schedule.max_iters >= {done}")
        if done == self.max_iters:
            self.log(f"{start} is at iteration {done} = schedule.max_iters: training is "
                     f"already complete, nothing to do (set a larger schedule.max_iters to "
                     f"train longer)")
        return done == self.max_iters

    def _build_optimisation(self, model: nn.Module) -> None:
        """The model on its device (SyncBatchNorm under torchrun on GPU, the text encoder
        frozen when asked), the optimiser, the schedule and the fp16 grad scaler."""
        cfg, env = self.cfg, self.env
        prepare_model(model.to(env.device), cfg.kernels)
        if env.distributed and env.device.type == "cuda":  # SyncBatchNorm needs CUDA
            model = self.task.convert_sync_batchnorm(model)
        if cfg.optim.freeze_text_encoder:
            freeze_text_encoder(model)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optim, fused=cfg.kernels == "fast")
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.amp == "fp16")

    def _restore(self, state: dict[str, Any], start: Path) -> None:
        """Weights, optimiser, schedule, scaler, iteration and this rank's RNG state."""
        load_checkpoint_object(self.model, state, start)  # read once already
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        ranks = state["rng"]
        set_rng_state(ranks[self.env.rank] if self.env.rank < len(ranks) else ranks[0])
        self.log(f"resumed from {start} at iteration {self.iteration}")

    def _build_stream(self) -> None:
        """DDP, the (compiled) training forward, ``config.yaml`` and the data stream from
        the current iteration on."""
        cfg, env = self.cfg, self.env
        if env.distributed:
            ids = [env.local_rank] if env.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # The training forward, compiled when asked (parameters shared with `model`, which
        # evaluation and checkpoints use as they are).
        self.forward = (torch.compile(self.model, backend=cfg.compile_backend)
                        if cfg.compile else self.model)
        if env.is_main:
            save_config(cfg, self.work_dir / "config.yaml")
        self.accumulate = max(1, cfg.optim.accumulate)
        self.loader = iter(_train_loader(cfg, self.train_set, env, self.iteration,
                                         self.task.collate, self.group_flags))
        effective = cfg.data.batch_size * env.world_size * self.accumulate
        self.log(f"training {cfg.name}: {len(self.train_set)} images, {self.iters_per_epoch} "
                 f"iterations per epoch, effective batch {effective} = {cfg.data.batch_size} "
                 f"per process x {env.world_size} process(es) x {self.accumulate} accumulation "
                 f"step(s) (the official recipe uses {self.task.official_batch_size})")
        self.meta = self.task.checkpoint_meta(self.train_set)
        self.meta.update(class_texts_meta(unwrap_model(self.model)))
        if self.init_loaded is not None:  # what initialised each part, what training fixed
            model = unwrap_model(self.model)
            learning = [n for g in param_groups(model, cfg.optim) if g["lr"] > 0
                        for n in g["names"]]
            self.meta["provenance"] = provenance_record(self.init_loaded,
                                                        model.state_dict(), learning)

    def default_hooks(self) -> list[HookBase]:
        """Logging, checkpoints, (with ``schedule.eval_interval``) evaluation and
        ``best.pth``, (with ``schedule.save_model``) ``work_dir/model/``, and the trackers
        of ``log.backends`` on the main process."""
        schedule = self.cfg.schedule
        hooks: list[HookBase] = [LoggingHook(schedule.log_interval, self.progress),
                                 CheckpointHook(schedule.checkpoint_interval)]
        best = None
        if self.val_set is not None:
            best = BestCheckpointHook(self.task.main_metric)
            hooks += [EvalHook(schedule.eval_interval, self.val_set), best]
        if schedule.save_model:
            hooks.append(SaveModelHook(best))
        if self.env.is_main:
            self.trackers = build_trackers(self.cfg, self.work_dir)
            hooks += self.trackers
        return hooks

    def register_hooks(self, hooks: Sequence[HookBase]) -> None:
        """Append ``hooks``: they run after those registered before, in their order."""
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    # ------------------------------------------------------------------ services to hooks
    def log(self, message: str) -> None:
        """An info line from the main process."""
        if self.env.is_main:
            _log.info(message)

    def write_metrics(self, mode: str, values: dict[str, float]) -> None:
        """One ``mode`` record of the current iteration in metrics.jsonl and the trackers
        of ``log.backends`` (TensorBoard by default)."""
        self.writer.log(self.iteration, mode, values)

    def poll_stop(self) -> int:
        """Ask whether a stop signal arrived on any rank (every rank calls it at the same
        points); a signal ends the run after the current step's hooks."""
        if self.stop is not None:
            self.stop_signal = self.stop.poll(self.env)
        return self.stop_signal

    def request_stop(self) -> None:
        """End training after the current step's hooks with a checkpoint of that step
        (``train`` then returns normally). Every rank must ask at the same step."""
        self.stop_requested = True

    def checkpoint(self) -> Path:
        """Write ``iter_N.pth`` of the current iteration (once: a second call returns the
        same file) and apply ``schedule.keep_checkpoints``; every rank calls it."""
        path = self.work_dir / f"iter_{self.iteration}.pth"
        if self._saved_at != self.iteration:
            _save(path, self.model, self.optimizer, self.scheduler, self.scaler,
                  self.iteration, self.cfg, self.env, self.meta)
            self._saved_at = self.iteration
        return path

    # ------------------------------------------------------------------ the loop
    def run_step(self) -> None:
        """One optimiser step: ``optim.accumulate`` batches forward under autocast and
        backward (scaled for fp16), gradient clipping, optimiser and scheduler step. The
        step's mean losses (and ``grad_norm``) are left in ``values``."""
        self.optimizer.zero_grad(set_to_none=True)
        self.values = values = {}
        finite = True
        for micro in range(self.accumulate):
            inputs, targets = self.task.to_device(next(self.loader), self.env.device)
            sync = micro == self.accumulate - 1 or not self.env.distributed
            with nullcontext() if sync else self.model.no_sync():
                with _train_mode(self.cfg, self.env.device):
                    losses = self.forward(inputs, targets)
                loss = sum(losses.values())
                finite = self._finite(loss, losses)
                if not finite:
                    break
                self.scaler.scale(loss / self.accumulate).backward()
            for k, v in losses.items():
                values[k] = values.get(k, 0.0) + v.item() / self.accumulate
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.cfg.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                values["grad_norm"] = float(nn.utils.clip_grad_norm_(
                    self.model.parameters(), self.cfg.optim.grad_clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()

    def _finite(self, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> bool:
        """Whether ``loss`` is finite; if not, skip the step (``nonfinite_loss=skip``,
        returns False) or raise :class:`NonFiniteLossError`."""
        if torch.isfinite(loss.detach()):
            return True
        shown = {k: v.item() for k, v in losses.items()}
        step = self.iteration + 1
        if self.cfg.nonfinite_loss == "skip":
            self.log(f"\niteration {step}: non-finite loss {shown}, step skipped")
            return False
        raise NonFiniteLossError(
            f"iteration {step}: the loss is not finite ({shown}); the last good checkpoint "
            f"in {self.work_dir} is intact. Lower optim.lr, try amp=none, or set "
            f"nonfinite_loss=skip")

    def train(self) -> dict[str, Any]:
        """Run the steps up to ``max_iters`` with the hooks around them; returns the last
        evaluation's metrics. A stop signal raises :class:`~.guard.TrainingStopped` after
        the step's hooks and a checkpoint; :meth:`request_stop` returns after them."""
        if self.complete:
            return {}
        self.writer = MetricLogger(self.work_dir, self.env.is_main, self.trackers)
        self.model.train()
        try:
            self._call("before_train")
            while self.iteration < self.max_iters:
                self._call("before_step")
                self.run_step()
                self.iteration += 1
                self.poll_stop()  # every rank here: a signal on any stops all after this step
                self._call("after_step")
                if self.stop_signal or self.stop_requested:
                    saved = self.checkpoint()
                    if self.stop_signal:
                        raise TrainingStopped(self.stop_signal, saved, self.iteration)
                    break
            self.finished = True
        finally:
            try:
                self._call("after_train")
            finally:
                self.writer.close()
        return self.last_metrics

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)()


def train(cfg: Config, work_dir: str | Path, resume: bool = False,
          load_from: str | None = None, env: DistEnv | None = None,
          progress: bool = True, text_weights: str | None = None,
          hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    """Train ``cfg`` in ``work_dir``; returns the last evaluation's metrics (if any).

    ``load_from`` initialises the weights from any checkpoint :func:`load_checkpoint`
    accepts (OpenAI CLIP, ImageNet torchvision/timm state dicts, releases, ours);
    ``text_weights`` then loads only the text tower from an OpenAI CLIP file
    (:func:`load_text_weights`), for backbones that are not CLIP's. Neither applies when
    resuming, whose checkpoint holds every weight; a resumed run may change only the
    settings of :data:`~.guard.RESUMABLE` (``cfg`` against the checkpoint's config).
    ``hooks`` (:class:`~.hooks.HookBase`) run after the default ones at every step.

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
        trainer = Trainer(cfg, work_dir, env, resume=resume, load_from=load_from,
                          text_weights=text_weights, progress=progress, stop=stop)
        trainer.register_hooks(hooks)
        return trainer.train()


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
         progress: bool = True, precision: str = "fp32",
         calibration: Calibration | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (any format :func:`load_checkpoint` accepts) on the
    validation split of ``cfg.data``: mIoU for segmentation, COCO AP for detection.

    ``precision`` is the inference precision (``fp32`` by default, so that reproduced
    numbers are reproducible; ``auto``/``bf16``/``fp16`` as in :mod:`denseclip.runtime`;
    ``int8`` quantises the model, calibrated on ``calibration``, see
    :mod:`denseclip.inference.int8`); the result's ``precision`` says which one ran.

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
        untrained = untrained_message(report)
        if untrained:
            warnings.warn(untrained, UntrainedPartsWarning, stacklevel=2)
    prepare_model(model.to(env.device), cfg.kernels).eval()
    if resolve_precision(precision, env.device) == "int8":  # CPUs only (a clear error)
        model = quantize_model(model, cfg, calibration)
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

