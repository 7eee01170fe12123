"""The guards around a training run: one training per work dir, graceful stop (also under
torchrun), settings a resume may change, checkpoint retention, stale temporaries and a full
disk while writing a checkpoint."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import denseclip
from denseclip.config import ConfigError
from denseclip.dist import DistEnv
from denseclip.engine import trainer
from denseclip.engine.guard import (
    GracefulStop,
    WorkDirBusyError,
    lock_work_dir,
    remove_stale_temporaries,
    resume_config,
)
from denseclip.weights import CheckpointError, read_checkpoint, save_checkpoint
from tests.engine.test_training import ENV, cli, overrides, wait_for_iteration


def config(root: Path, *extra: str):
    return denseclip.load_config("tiny_denseclip_res", overrides(
        root, "schedule.eval_interval=0", "schedule.checkpoint_interval=1", *extra))


def test_a_second_training_in_the_same_work_dir_is_refused(tmp_path, data_root):
    work = tmp_path / "w"
    args = ["train", "tiny_denseclip_res", "--work-dir", str(work), "--no-progress",
            *overrides(data_root, "schedule.max_iters=100000", "schedule.eval_interval=0",
                       "schedule.checkpoint_interval=100000")]
    first = subprocess.Popen([sys.executable, "-m", "denseclip", *args], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_iteration(work, first, 1)
        second = cli(*args)
        assert second.returncode == 1
        assert f"{work} is in use by another training (pid {first.pid} on" in second.stderr
        assert "denseclip train tiny_denseclip_res" in second.stderr  # the holder's command
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one goes on undisturbed
    finally:
        first.send_signal(signal.SIGUSR1)
        _, err = first.communicate(timeout=240)
    assert first.returncode == 128 + signal.SIGUSR1, err
    assert "stopped by SIGUSR1" in err
    with lock_work_dir(work, DistEnv()):  # released on exit
        pass


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from denseclip.dist import DistEnv; "
         "from denseclip.engine.guard import lock_work_dir\n"
         "with lock_work_dir(Path(sys.argv[1]), DistEnv()):\n"
         "    print('locked', flush=True); sys.stdin.read()", str(tmp_path)],
        env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(WorkDirBusyError, match=f"in use by another training \\(pid "
                                               f"{holder.pid} on "):
        with lock_work_dir(tmp_path, DistEnv()):
            pass
    holder.kill()  # no clean-up runs: the kernel drops the lock
    holder.wait()
    with lock_work_dir(tmp_path, DistEnv()):
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid()


def test_sigterm_to_one_torchrun_rank_stops_both_at_the_same_step(tmp_path, data_root):
    work = tmp_path / "dist"
    run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "denseclip", "train", "tiny_denseclip_res", "--work-dir", str(work),
         "--device", "cpu", "--no-progress",
         *overrides(data_root, "schedule.max_iters=100000", "schedule.eval_interval=0",
                    "schedule.checkpoint_interval=100000")],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_iteration(work, run, 1)
    children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
    assert len(children) == 2
    os.kill(int(children[1]), signal.SIGTERM)  # one worker only
    _, err = run.communicate(timeout=240)
    assert run.returncode != 0
    (ckpt,) = work.glob("iter_*.pth")  # one checkpoint, written by rank 0 at the agreed step
    state = read_checkpoint(ckpt)
    assert ckpt.name == f"iter_{state['iteration']}.pth" and len(state["rng"]) == 2
    assert f"stopped by SIGTERM after iteration {state['iteration']}" in err


def test_graceful_stop_defers_signals_and_restores_the_previous_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append("previous"))
    try:
        with GracefulStop(announce=False) as stop:
            assert stop.poll(DistEnv()) == 0
            signal.raise_signal(signal.SIGUSR1)
            assert stop.poll(DistEnv()) == signal.SIGUSR1 and seen == []
        signal.raise_signal(signal.SIGUSR1)
        assert seen == ["previous"]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_keep_checkpoints_and_handlers_restored_after_training(tmp_path, data_root):
    work = tmp_path / "keep"
    work.mkdir()
    (work / "best.pth").write_bytes(b"kept whatever it holds")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    trainer.train(config(data_root, "schedule.max_iters=4", "schedule.keep_checkpoints=2"),
                  work, env=DistEnv(), progress=False)
    assert sorted(p.name for p in work.glob("*.pth")) == ["best.pth", "iter_3.pth",
                                                           "iter_4.pth"]
    assert {s: signal.getsignal(s) for s in before} == before


def test_resume_applies_harmless_settings_and_refuses_the_others(tmp_path, data_root, caplog):
    work = tmp_path / "r"
    trainer.train(config(data_root, "schedule.max_iters=2"), work, env=DistEnv(),
                  progress=False)
    ckpt = work / "iter_2.pth"
    with caplog.at_level("INFO", logger="denseclip"):
        trainer.train(config(data_root, "schedule.max_iters=2"), work, resume=True,
                      env=DistEnv(), progress=False)
    assert "iteration 2 = schedule.max_iters: training is already complete" in caplog.text

    with pytest.raises(ConfigError) as err:
        trainer.train(config(data_root, "schedule.max_iters=3", "optim.lr=0.5",
                             "model.guidance.tau=0.1"), work, resume=True, env=DistEnv(),
                      progress=False)
    message = str(err.value)
    assert f"cannot resume {ckpt}" in message and "new --work-dir" in message
    assert "optim.lr is 0.0001 in the checkpoint, 0.5 requested" in message
    assert "model.guidance.tau is 0.07 in the checkpoint, 0.1 requested" in message
    assert not (work / "iter_3.pth").exists()

    caplog.clear()
    with caplog.at_level("INFO", logger="denseclip"):
        trainer.train(config(data_root, "schedule.max_iters=3", "schedule.log_interval=3",
                             "data.num_workers=1"), work, resume=True, env=DistEnv(),
                      progress=False)
    assert ("resuming with changed settings: data.num_workers 0 → 1, schedule.log_interval "
            "1 → 3, schedule.max_iters 2 → 3") in caplog.text
    saved = read_checkpoint(work / "iter_3.pth")["config"]
    assert saved["schedule"]["max_iters"] == 3 and saved["optim"]["lr"] == 1e-4


def test_resume_config_derives_max_iters_from_epochs():
    saved = denseclip.load_config("tiny_denseclip_res", ["schedule.max_epochs=2"])
    saved.schedule.max_iters = 12  # what training turned the epochs into
    requested = denseclip.load_config("tiny_denseclip_res", ["schedule.max_epochs=3"])
    cfg, lines = resume_config(saved, requested, "ckpt")
    assert lines == ["schedule.max_epochs 2 → 3"] and cfg.schedule.max_epochs == 3


def test_max_iters_below_one_is_refused(tmp_path, data_root):
    with pytest.raises(ConfigError, match=r"schedule.max_iters=-5: must be >= 1"):
        config(data_root, "schedule.max_iters=-5")  # when the config loads
    cfg = config(data_root)
    cfg.schedule.max_iters = -5  # a config changed in code after loading: train() says so
    with pytest.raises(ConfigError, match="schedule.max_iters must be at least 1, got -5"):
        trainer.train(cfg, tmp_path / "neg", env=DistEnv(), progress=False)
    assert not (tmp_path / "neg").exists()


def test_only_our_stale_temporaries_are_removed(tmp_path):
    ours = [".iter_8.pth.ab_cd123.tmp", ".best.pth.0123abcd.tmp"]
    theirs = [".iter_8.pth.tmp", ".config.yaml.ab_cd123.tmp", "iter_8.pth", ".x.ab_cd123.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))


def test_full_disk_while_checkpointing_says_so_and_keeps_the_previous_one(tmp_path,
                                                                          data_root):
    work = tmp_path / "full"
    args = ["train", "tiny_denseclip_res", "--work-dir", str(work), "--no-progress",
            *overrides(data_root, "schedule.eval_interval=0", "schedule.checkpoint_interval=2")]
    assert cli(*args, "schedule.max_iters=2").returncode == 0
    before = read_checkpoint(work / "iter_2.pth")
    # the tiny model's checkpoint (~25 MB) cannot fit under a 4 MB file-size limit
    run = cli(*args, "--resume", "schedule.max_iters=4", preexec_fn=_limit_file_size)
    assert run.returncode == 1
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"denseclip train: error: no space left on device writing "
                           f"{work / 'iter_4.pth'} (")
    assert "MB needed" in line and "enforce fail" not in run.stderr
    assert "Traceback" not in run.stderr
    assert not (work / "iter_4.pth").exists() and not list(work.glob(".*.tmp"))
    after = read_checkpoint(work / "iter_2.pth")
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    assert json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])["iter"] == 4


def test_resuming_from_a_file_that_is_not_a_training_checkpoint_says_so(tmp_path, data_root):
    work = tmp_path / "w"
    work.mkdir()
    cfg = config(data_root)
    save_checkpoint(work / "iter_3.pth", denseclip.build_model(cfg))  # weights only
    with pytest.raises(CheckpointError, match=r"iter_3.pth is not a checkpoint of denseclip "
                                              r"train \(no iteration, optimizer, scheduler, "
                                              r"scaler, rng\).*--load-from"):
        trainer.train(cfg, work, resume=True, env=DistEnv(), progress=False)
