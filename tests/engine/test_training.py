"""Training engine end to end through the real CLI: resume after kill -9 or SIGTERM, non-finite
losses, torchrun with two processes (gloo), evaluation sharding and the learning-rate
schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import denseclip
from denseclip.config import ScheduleConfig
from denseclip.data import make_synthetic_dataset
from denseclip.dist import DistEnv
from denseclip.engine import trainer
from denseclip.engine.optim import build_optimizer, build_scheduler, param_groups, poly_lr
from denseclip.engine.trainer import newest_checkpoint
from denseclip.weights import read_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=12, num_val=5,
                                  size=(64, 80), seed=0)


def config(root: Path, *extra: str):
    """``tiny_denseclip_res`` on the data at ``root``, with :func:`overrides`."""
    return denseclip.load_config("tiny_denseclip_res", overrides(root, *extra))


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"model.classes={root}/classes.txt", "data.batch_size=2",
            "data.num_workers=0", "schedule.log_interval=1", "evaluation.mode=whole", *extra]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "denseclip", *args], env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


def train_losses(work: Path) -> dict[int, dict[str, float]]:
    """Each iteration's logged training values, without the timing."""
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    return {x["iter"]: {k: v for k, v in x.items() if k != "sec_per_iter"} for x in lines}


def wait_for_iteration(work: Path, proc: subprocess.Popen, iteration: int) -> None:
    """Block until the training in ``proc`` has logged ``iteration`` (log_interval=1)."""
    deadline = time.monotonic() + 240
    while not ((work / "metrics.jsonl").exists() and
               max(train_losses(work), default=0) >= iteration):
        assert proc.poll() is None, "training ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_kill_9_or_sigterm_then_resume_ends_with_the_same_weights(tmp_path, data_root):
    common = overrides(data_root, "schedule.max_iters=12", "schedule.checkpoint_interval=4",
                       "schedule.eval_interval=0")
    ref = cli("train", "tiny_denseclip_res", "--work-dir", str(tmp_path / "ref"),
              "--no-progress", *common)
    assert ref.returncode == 0, ref.stderr
    expected = model_state(tmp_path / "ref/iter_12.pth")

    def popen(work: Path, **kw) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "denseclip", "train", "tiny_denseclip_res", "--work-dir",
             str(work), "--no-progress", *common], env=ENV, stdout=subprocess.DEVNULL, **kw)

    def resume_and_compare(work: Path) -> None:
        resumed = cli("train", "tiny_denseclip_res", "--work-dir", str(work), "--resume",
                      "--no-progress", *common)
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from" in resumed.stdout
        final = model_state(work / "iter_12.pth")
        assert final.keys() == expected.keys()
        # Bit for bit: both runs are the same computation on the same machine, kernels and
        # thread count (ENV), so a resume must not change a single weight. Not a cross-machine
        # claim: another CPU's kernels give other (equally valid) weights.
        for key in expected:
            assert torch.equal(final[key], expected[key]), key
        # The optimiser state continued too.
        state = read_checkpoint(work / "iter_12.pth")
        assert state["iteration"] == 12 and state["scheduler"]["last_epoch"] == 12

    # kill -9: nothing can be saved; the last periodic checkpoint is the way back
    work = tmp_path / "killed"
    proc = popen(work, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (work / "iter_4.pth").exists():  # wait for the event, then kill
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "iter_12.pth").exists()
    assert not list(work.glob(".*.tmp"))  # no half-written checkpoint left visible
    resume_and_compare(work)

    # SIGTERM: the current iteration ends, a checkpoint of it is written, exit 143
    work = tmp_path / "stopped"
    proc = popen(work, stderr=subprocess.PIPE, text=True)
    wait_for_iteration(work, proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    stopped_at = max(train_losses(work))
    assert 2 <= stopped_at < 12, "the signal arrived after the run ended"
    ckpt = work / f"iter_{stopped_at}.pth"
    assert f"stopped by SIGTERM after iteration {stopped_at}: checkpoint {ckpt}" in err
    assert read_checkpoint(ckpt)["iteration"] == stopped_at
    assert newest_checkpoint(work) == ckpt
    # an interrupted write's temporary is cleaned up on the next start; others are not ours
    (work / ".iter_16.pth.x1y2z3_4.tmp").write_bytes(b"half a checkpoint")
    (work / "notes.tmp").write_text("mine")
    resume_and_compare(work)
    assert not (work / ".iter_16.pth.x1y2z3_4.tmp").exists() and (work / "notes.tmp").exists()
    # every iteration logged once, with the uninterrupted run's values
    assert train_losses(work) == train_losses(tmp_path / "ref")


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path,
                                                                            data_root):
    # A huge learning rate makes the weights blow up after the first step.
    args = overrides(data_root, "schedule.max_iters=6", "schedule.checkpoint_interval=1",
                     "schedule.eval_interval=0", "schedule.warmup_iters=0", "optim.lr=1e6")
    run = cli("train", "tiny_denseclip_res", "--work-dir", str(tmp_path / "stop"),
              "--no-progress", *args)
    assert run.returncode == 1
    assert "loss is not finite" in run.stderr and "nonfinite_loss=skip" in run.stderr
    ckpts = sorted(p.name for p in (tmp_path / "stop").glob("iter_*.pth"))
    assert ckpts, "the good iterations before the failure were checkpointed"
    last = read_checkpoint(tmp_path / "stop" / ckpts[-1])
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())

    skip = cli("train", "tiny_denseclip_res", "--work-dir", str(tmp_path / "skip"),
               "--no-progress", *args, "nonfinite_loss=skip")
    assert skip.returncode == 0, skip.stderr
    assert "step skipped" in skip.stdout
    assert (tmp_path / "skip" / "iter_6.pth").exists()


def test_torchrun_two_processes_train_and_evaluate_like_one(tmp_path, data_root):
    work = tmp_path / "dist"
    args = overrides(data_root, "schedule.max_iters=3", "schedule.checkpoint_interval=3",
                     "schedule.eval_interval=0")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "denseclip", "train", "tiny_denseclip_res", "--work-dir", str(work),
         "--device", "cpu", "--no-progress", *args],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "effective batch 4 = 2 per process x 2 process(es)" in run.stdout
    ckpt = work / "iter_3.pth"
    assert len(read_checkpoint(ckpt)["rng"]) == 2  # one RNG state per rank

    def evaluate(*launcher: str) -> dict:
        out = tmp_path / f"eval{len(launcher)}"
        proc = subprocess.run(
            [*launcher, "-m", "denseclip", "test", "tiny_denseclip_res", str(ckpt),
             "--out-dir", str(out), "--device", "cpu", "--no-progress", *args],
            env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(list(out.glob("*.png"))) == 5  # every validation image exactly once
        return json.loads((out / "metrics.json").read_text())

    single = evaluate(sys.executable)
    double = evaluate(sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node", "2")
    for key in ("mIoU", "mAcc", "aAcc"):
        assert single[key] == double[key]


def test_poly_schedule_with_warmup_matches_the_formula():
    cfg = ScheduleConfig(max_iters=100, warmup_iters=10, warmup_ratio=1e-6, power=0.9,
                         min_lr=1e-6)
    assert poly_lr(1e-4, 0, cfg) == pytest.approx(((1e-4 - 1e-6) + 1e-6) * 1e-6)
    assert poly_lr(1e-4, 5, cfg) == pytest.approx(
        ((1e-4 - 1e-6) * 0.95**0.9 + 1e-6) * (1 - 0.5 * (1 - 1e-6)))
    assert poly_lr(1e-4, 100, cfg) == pytest.approx(1e-6)
    model = denseclip.build_model(denseclip.load_config("tiny_denseclip_res"))
    optim_cfg = denseclip.load_config("tiny_denseclip_res").optim
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, cfg)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    for group in optimizer.param_groups:
        base = group["initial_lr"]
        assert group["lr"] == pytest.approx(poly_lr(base, 50, cfg))


def test_param_groups_follow_the_multipliers():
    cfg = denseclip.load_config("tiny_denseclip_res")
    model = denseclip.build_model(cfg)
    groups = param_groups(model, cfg.optim)
    by_name = {n: g for g in groups for n in g["names"]}
    # official custom keys: text_encoder lr ×0 (still in the optimiser), backbone lr ×0.1
    # (its norms too: "backbone" is matched before "norm"), context-decoder norms decay ×0
    text = by_name["guidance.text_encoder.transformer.resblocks.0.ln_1.weight"]
    assert text["lr"] == 0.0 and text["weight_decay"] == pytest.approx(1e-4)
    assert by_name["backbone.conv1.weight"]["lr"] == pytest.approx(cfg.optim.lr * 0.1)
    assert by_name["backbone.bn1.weight"]["weight_decay"] == pytest.approx(1e-4)
    assert by_name["head.conv_seg.weight"]["lr"] == pytest.approx(cfg.optim.lr)
    assert by_name["head.conv_seg.weight"]["weight_decay"] == pytest.approx(1e-4)
    assert by_name["guidance.context_decoder.decoder.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["guidance.contexts"]["weight_decay"] == pytest.approx(1e-4)
    assert by_name["head.scale_heads.0.0.bn.weight"]["weight_decay"] == pytest.approx(1e-4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable


def test_bf16_training_and_slide_aug_evaluation_in_process(tmp_path, data_root):
    cfg = denseclip.load_config("tiny_denseclip_res", overrides(
        data_root, "schedule.max_iters=2", "schedule.checkpoint_interval=2",
        "schedule.eval_interval=0", "amp=bf16", "evaluation.mode=slide",
        "evaluation.aug_ratios=[0.75,1.0]"))
    trainer.train(cfg, tmp_path / "bf16", env=DistEnv(), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "bf16/metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2]
    assert all(np.isfinite(x["loss"]) for x in lines)
    out = tmp_path / "pred"
    metrics = trainer.test(cfg, tmp_path / "bf16/iter_2.pth", aug_test=True, out_dir=out,
                   env=DistEnv(), progress=False)
    assert 0 <= metrics["mIoU"] <= 100 and len(metrics["per_class"]) == 5
    # One PNG per validation image, at the image's original size, in ADE label space.
    for img in sorted((data_root / "images/validation").glob("*.jpg")):
        pred = np.array(Image.open(out / f"{img.stem}.png"))
        assert pred.shape == Image.open(img).size[::-1]
        assert pred.min() >= 1 and pred.max() <= 5


def test_quickstart_command_runs_end_to_end(tmp_path):
    run = cli("quickstart", "--work-dir", str(tmp_path / "qs"), "--num-train", "6",
              "--num-val", "2", "--no-progress", "schedule.max_iters=2",
              "schedule.checkpoint_interval=2", "data.num_workers=0", "data.batch_size=2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "validation mIoU" in run.stdout.splitlines()[-1]
    assert (tmp_path / "qs/iter_2.pth").exists() and (tmp_path / "qs/config.yaml").exists()


def test_cli_reports_missing_dataset_without_traceback(tmp_path):
    run = cli("train", "tiny_denseclip_res", "--work-dir", str(tmp_path / "w"),
              f"data.root={tmp_path / 'nowhere'}", "schedule.eval_interval=0")
    assert run.returncode == 1
    assert "nowhere" in run.stderr and "Traceback" not in run.stderr


def test_compiled_training_forward_equals_eager(tmp_path, data_root):
    """``compile=true`` runs the training forward through torch.compile (backend
    aot_eager here: the real tracing and autograd machinery, no C++ compiler needed) and
    gives the eager run's weights after the same steps."""
    states = {}
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for flag in ("false", "true"):
        cfg = denseclip.load_config("tiny_denseclip_res", overrides(
            data_root, "schedule.max_iters=2", "schedule.checkpoint_interval=2",
            "schedule.eval_interval=0", f"compile={flag}", "compile_backend=aot_eager"))
        trainer.train(cfg, tmp_path / flag, env=DistEnv(), progress=False)
        states[flag] = model_state(tmp_path / flag / "iter_2.pth")
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0 if flag == "true" else graphs == 0  # really compiled, or not
    for key, value in states["false"].items():
        torch.testing.assert_close(states["true"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.manual_seed(0)
    initial = denseclip.build_model(cfg).state_dict()
    moved = sum(not torch.equal(initial[k], v) for k, v in states["false"].items()
                if v.is_floating_point())
    assert moved > 10
