"""Hooks around the training loop of :class:`~.trainer.Trainer`, in detectron2's shape.

A hook subclasses :class:`HookBase` and overrides any of four points: ``before_train``,
``before_step``, ``after_step`` and ``after_train`` (which runs also when training fails or
stops on a signal). ``self.trainer`` is the trainer that registered it; a hook may read its
``iteration`` (steps done: in ``after_step`` the step just finished), ``max_iters``,
``cfg``, ``env``, ``model``, ``optimizer``, ``scheduler``, ``task``, ``values`` (the step's
mean losses), ``last_metrics`` and ``last_eval_iteration`` (the newest evaluation), and call
``checkpoint()``, ``write_metrics()``, ``log()`` and ``request_stop()``.

The default hooks run in this order each step: :class:`LoggingHook`, :class:`CheckpointHook`,
:class:`EvalHook`; hooks passed to ``train(..., hooks=[...])`` run after them. The graceful
stop on signals is the trainer's own (every rank must agree on it): it polls after each step
and after each evaluation, skips an evaluation that is due once a signal arrived, and ends
with a checkpoint. New behaviour is a hook: a best-checkpoint hook, for instance, compares
``last_metrics[task.main_metric]`` in ``after_step`` whenever ``last_eval_iteration`` equals
``iteration``.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from ..runtime import run_mode


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
