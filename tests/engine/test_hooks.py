"""The training loop's hooks: what a registered hook sees and when, a hook that stops the
run (with a checkpoint that resumes exactly), a stop signal that skips a due evaluation,
and the end-of-training hooks running when a step fails."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from denseclip.dist import DistEnv
from denseclip.engine import trainer
from denseclip.engine.guard import TrainingStopped, lock_work_dir
from denseclip.engine.hooks import HookBase
from tests.engine.test_training import config, model_state


def records(work: Path) -> list[tuple[str, int]]:
    lines = (work / "metrics.jsonl").read_text().splitlines()
    return [(x["mode"], x["iter"]) for x in map(json.loads, lines)]


class Recorder(HookBase):
    """Writes down every call with what the trainer shows at that point."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def before_train(self) -> None:
        self.events.append(("before_train", self.trainer.iteration))

    def before_step(self) -> None:
        self.events.append(("before_step", self.trainer.iteration))

    def after_step(self) -> None:
        t = self.trainer
        self.events.append(("after_step", t.iteration, sorted(t.values),
                            (t.work_dir / f"iter_{t.iteration}.pth").exists(),
                            t.last_eval_iteration))

    def after_train(self) -> None:
        self.events.append(("after_train", self.trainer.iteration))


def test_a_registered_hook_sees_each_step_after_the_default_hooks(tmp_path, data_root):
    hook = Recorder()
    cfg = config(data_root, "schedule.max_iters=3", "schedule.checkpoint_interval=2",
                 "schedule.eval_interval=2")
    metrics = trainer.train(cfg, tmp_path / "w", env=DistEnv(), progress=False, hooks=[hook])
    keys = ["loss", "loss_aux", "loss_seg", "lr", "sec_per_iter"]  # logged every step
    # after_step runs after the checkpoint and the evaluation that are due at that step
    assert hook.events == [
        ("before_train", 0),
        ("before_step", 0), ("after_step", 1, keys, False, -1),
        ("before_step", 1), ("after_step", 2, keys, True, 2),
        ("before_step", 2), ("after_step", 3, keys, True, 3),
        ("after_train", 3)]
    assert records(tmp_path / "w") == [("train", 1), ("train", 2), ("val", 2), ("train", 3),
                                       ("val", 3)]
    assert 0 <= metrics["mIoU"] <= 100


class StopAt(HookBase):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def after_step(self) -> None:
        if self.trainer.iteration == self.iteration:
            self.trainer.request_stop()


def test_a_hook_stops_training_with_a_checkpoint_that_resumes_exactly(tmp_path, data_root):
    def cfg():
        return config(data_root, "schedule.max_iters=5", "schedule.checkpoint_interval=100",
                      "schedule.eval_interval=0")

    trainer.train(cfg(), tmp_path / "ref", env=DistEnv(), progress=False)
    work = tmp_path / "stopped"
    seen = Recorder()
    assert trainer.train(cfg(), work, env=DistEnv(), progress=False,
                         hooks=[StopAt(2), seen]) == {}
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_2.pth"]
    assert records(work) == [("train", 1), ("train", 2)]
    assert seen.events[-2][:2] == ("after_step", 2) and seen.events[-1] == ("after_train", 2)

    trainer.train(cfg(), work, resume=True, env=DistEnv(), progress=False)
    assert records(work) == [("train", i) for i in range(1, 6)]
    expected = model_state(tmp_path / "ref/iter_5.pth")
    final = model_state(work / "iter_5.pth")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], v) for k, v in expected.items())


class SignalBefore(HookBase):
    """Sends this process SIGUSR1 while the step after ``iteration`` is about to run."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def before_step(self) -> None:
        if self.trainer.iteration == self.iteration:
            signal.raise_signal(signal.SIGUSR1)


def test_a_stop_signal_ends_the_step_skips_the_due_evaluation_and_checkpoints(tmp_path,
                                                                            data_root):
    work = tmp_path / "sig"
    seen = Recorder()
    cfg = config(data_root, "schedule.max_iters=6", "schedule.checkpoint_interval=100",
                 "schedule.eval_interval=3")
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(TrainingStopped) as stopped:
        trainer.train(cfg, work, env=DistEnv(), progress=False, hooks=[SignalBefore(2), seen])
    assert (stopped.value.iteration, stopped.value.exit_code) == (3, 128 + signal.SIGUSR1)
    assert stopped.value.checkpoint == work / "iter_3.pth"
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_3.pth"]
    # step 3 was logged; its evaluation was due but skipped for the stop
    assert records(work) == [("train", 1), ("train", 2), ("train", 3)]
    assert seen.events[-1] == ("after_train", 3)
    assert signal.getsignal(signal.SIGUSR1) == before


class FailAt(HookBase):
    def after_step(self) -> None:
        if self.trainer.iteration == 2:
            raise RuntimeError("hook failed at iteration 2")


def test_after_train_runs_and_the_work_dir_is_released_when_a_hook_fails(tmp_path, data_root):
    work = tmp_path / "fail"
    seen = Recorder()
    cfg = config(data_root, "schedule.max_iters=4", "schedule.checkpoint_interval=100",
                 "schedule.eval_interval=0")
    with pytest.raises(RuntimeError, match="hook failed at iteration 2"):
        trainer.train(cfg, work, env=DistEnv(), progress=False, hooks=[seen, FailAt()])
    assert seen.events[-1] == ("after_train", 2)
    assert records(work) == [("train", 1), ("train", 2)]  # written before the failure
    assert not list(work.glob("*.pth"))
    with lock_work_dir(work, DistEnv()):  # free again
        pass
