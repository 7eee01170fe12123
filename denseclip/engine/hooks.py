"""Hooks around the training loop of :class:`~.trainer.Trainer`, in detectron2's shape.

A hook subclasses :class:`HookBase` and overrides any of four points: ``before_train``,
``before_step``, ``after_step`` and ``after_train`` (which runs also when training fails or
stops on a signal). ``self.trainer`` is the trainer that registered it; a hook may read its
``iteration`` (steps done: in ``after_step`` the step just finished), ``max_iters``,
``cfg``, ``env``, ``model``, ``optimizer``, ``scheduler``, ``task``, ``values`` (the step's
mean losses), ``last_metrics`` and ``last_eval_iteration`` (the newest evaluation), and call
``checkpoint()``, ``write_metrics()``, ``log()`` and ``request_stop()``.

The default hooks run in this order each step: :class:`LoggingHook`, :class:`CheckpointHook`,
:class:`EvalHook`, :class:`BestCheckpointHook` (with evaluation), :class:`SaveModelHook`
(``schedule.save_model``) and the trackers of :mod:`.trackers` (``log.backends``, main
process); hooks passed to ``train(..., hooks=[...])`` run after them. The graceful
stop on signals is the trainer's own (every rank must agree on it): it polls after each step
and after each evaluation, skips an evaluation that is due once a signal arrived, and ends
with a checkpoint. New behaviour is a hook: :class:`BestCheckpointHook`, for instance,
compares ``last_metrics[task.main_metric]`` in ``after_step`` whenever
``last_eval_iteration`` equals ``iteration``. ``finished`` (the loop ended without an error
or a stop signal) and ``saved_model`` (``work_dir/model`` once written) serve the
``after_train`` hooks.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..runtime import run_mode
from ..utils import unwrap_model
from ..weights.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from ..weights.pretrained import save_pretrained

BEST_NAME = "best.pth"
MODEL_DIR = "model"


class HookBase:
    """A hook of the training loop; every method does nothing unless overridden."""

    trainer: Any = None  # the Trainer, set when it registers the hook

    def before_train(self) -> None:
        """Once, before the first step (also of a resumed run)."""

    def before_step(self) -> None:
        """Before each step; ``trainer.iteration`` steps are done."""

    def after_step(self) -> None:
        """After each step; ``trainer.iteration`` is the step just finished."""

    def after_train(self) -> None:
        """Once at the end, also when training fails or stops on a signal."""


def _due(iteration: int, interval: int, last: int) -> bool:
    """Every ``interval`` steps and at the last one."""
    return iteration % interval == 0 or iteration == last


class LoggingHook(HookBase):
    """The progress bar, and every ``interval`` steps (and at the last) one ``train`` record
    of the step's losses, their sum ``loss``, the learning rate of the first parameter group
    (the next step's) and ``sec_per_iter`` since the previous record, in ``metrics.jsonl``
    and TensorBoard."""

    def __init__(self, interval: int, progress: bool = True) -> None:
        self.interval = interval
        self.progress = progress
        self.bar: tqdm | None = None
        self.tick = 0.0

    def before_train(self) -> None:
        t = self.trainer
        self.bar = tqdm(total=t.max_iters, initial=t.iteration, desc="train",
                        dynamic_ncols=True, disable=not (self.progress and t.env.is_main))
        self.tick = time.perf_counter()

    def after_step(self) -> None:
        t = self.trainer
        self.bar.update(1)
        if not _due(t.iteration, self.interval, t.max_iters):
            return
        now = time.perf_counter()
        values = t.values
        values["loss"] = sum(v for k, v in values.items() if k.startswith("loss"))
        values["lr"] = t.optimizer.param_groups[0]["lr"]
        values["sec_per_iter"] = (now - self.tick) / self.interval
        self.tick = now
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        t.write_metrics("train", values)

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CheckpointHook(HookBase):
    """``iter_N.pth`` every ``interval`` steps and at the last step (the trainer's
    :meth:`~.trainer.Trainer.checkpoint` applies ``schedule.keep_checkpoints``)."""

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def after_step(self) -> None:
        t = self.trainer
        if _due(t.iteration, self.interval, t.max_iters):
            t.checkpoint()


class EvalHook(HookBase):
    """Evaluate on ``dataset`` every ``interval`` steps and at the last step, in fp32 (so
    that runs compare), unless a stop signal arrived: the result becomes the trainer's
    ``last_metrics``, its summary one log line and one ``val`` record. Polls for a stop
    signal afterwards (one may arrive during a long evaluation)."""

    def __init__(self, interval: int, dataset) -> None:
        self.interval = interval
        self.dataset = dataset

    def after_step(self) -> None:
        t = self.trainer
        if t.stop_signal or not _due(t.iteration, self.interval, t.max_iters):
            return
        with run_mode("fp32", t.cfg.kernels, t.env.device):
            t.last_metrics = t.task.evaluate(t.model, self.dataset, t.env,
                                             progress=t.progress)
        t.last_eval_iteration = t.iteration
        summary = {k: t.last_metrics[k] for k in t.task.summary_keys}
        t.log(f"\niteration {t.iteration}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                        summary.items()))
        t.write_metrics("val", summary)
        t.model.train()
        t.poll_stop()


class BestCheckpointHook(HookBase):
    """``best.pth``: the weights of the evaluation with the highest ``metric`` so far (the
    task's ``main_metric``), written atomically (main process) whenever an evaluation beats
    it, with ``iteration``, ``config``, the task's metadata and ``best`` (``metric``,
    ``value``, ``iteration`` and the evaluation's ``summary``). It holds no optimiser
    state: resuming continues from the newest ``iter_N.pth``; ``best.pth`` is for use.
    A resumed run starts from the best recorded in ``best.pth``, so a worse evaluation
    never replaces it."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.best: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.trainer.work_dir / BEST_NAME

    def before_train(self) -> None:
        t = self.trainer
        if t.iteration == 0 or not self.path.is_file():  # a new run replaces an old best
            return
        try:
            best = read_checkpoint(self.path).get("best")
        except (CheckpointError, OSError, RuntimeError, ValueError) as e:
            t.log(f"{self.path} is unreadable ({e}): the next evaluation replaces it")
            return
        if isinstance(best, dict) and best.get("metric") == self.metric:
            self.best = best
            t.log(f"best so far: {self.metric} {best['value']:.2f} at iteration "
                  f"{best['iteration']} ({self.path})")

    def after_step(self) -> None:
        t = self.trainer
        if t.last_eval_iteration != t.iteration:
            return
        if self.metric not in t.last_metrics:
            raise KeyError(f"the evaluation returned no {self.metric!r} (the task's main "
                           f"metric) to pick best.pth by; it returned "
                           f"{', '.join(sorted(t.last_metrics))}")
        value = float(t.last_metrics[self.metric])
        if not math.isfinite(value) or (self.best is not None and value <= self.best["value"]):
            return
        self.best = {"metric": self.metric, "value": value, "iteration": t.iteration,
                     "summary": {k: float(t.last_metrics[k]) for k in t.task.summary_keys}}
        if t.env.is_main:
            save_checkpoint(self.path, t.model, iteration=t.iteration, config=t.cfg.to_dict(),
                            best=self.best, **t.meta)
        t.log(f"iteration {t.iteration}: best {self.metric} so far ({value:.2f}): "
              f"{self.path}")


class SaveModelHook(HookBase):
    """At the end of a run that finished (not one that failed or stopped on a signal),
    the main process writes ``work_dir/model/`` with
    :func:`~denseclip.weights.pretrained.save_pretrained` (weights, config, classes, model
    card), which ``predict``, ``demo`` and ``export`` accept: the weights of ``best.pth``
    when ``best`` (a :class:`BestCheckpointHook`) has one, else the final weights. The card
    lists the best evaluation's summary and the final one (when the last step was
    evaluated). Sets the trainer's ``saved_model``."""

    def __init__(self, best: BestCheckpointHook | None = None) -> None:
        self.best = best

    def after_train(self) -> None:
        t = self.trainer
        if not t.finished or not t.env.is_main:
            return
        metrics: dict[str, float] = {}
        best = self.best.best if self.best is not None else None
        if best is not None:
            metrics.update({f"{k} at iteration {best['iteration']} (best: these weights)": v
                            for k, v in best["summary"].items()})
        if t.last_eval_iteration == t.iteration:
            metrics.update({f"{k} at iteration {t.iteration} (final)": float(t.last_metrics[k])
                            for k in t.task.summary_keys})
        model = unwrap_model(t.model)
        directory = t.work_dir / MODEL_DIR
        if best is None:
            save_pretrained(model, directory, cfg=t.cfg, metrics=metrics)
        else:  # the best weights into the model for the write, the final ones back after
            final = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            try:
                model.load_state_dict(read_checkpoint(self.best.path)["model"])
                save_pretrained(model, directory, cfg=t.cfg, metrics=metrics)
            finally:
                model.load_state_dict(final)
        t.saved_model = directory
        which = (f"the weights of best.pth (iteration {best['iteration']})" if best is not None
                 else f"the final weights (iteration {t.iteration})")
        t.log(f"saved {directory} with {which}: use it with denseclip predict, demo or export")
