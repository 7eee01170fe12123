"""``denseclip plot``: curves of a real training run's metrics.jsonl, and clear errors for
missing or damaged logs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import denseclip
from denseclip.cli import main
from denseclip.data import make_synthetic_dataset
from denseclip.dist import DistEnv
from denseclip.engine import trainer
from denseclip.engine.trainer import MetricLogger
from denseclip.evaluation.plots import metric_series, read_metrics_log
from tests.helpers.pictures import assert_picture


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A work dir of a real four-iteration training run that evaluates twice."""
    base = tmp_path_factory.mktemp("plot_run")
    root = make_synthetic_dataset(base / "data", num_train=4, num_val=2, size=(48, 64), seed=0)
    cfg = denseclip.load_config("tiny_denseclip_res", [
        f"data.root={root}", f"model.classes={root}/classes.txt", "data.num_workers=0",
        "data.batch_size=2", "evaluation.mode=whole", "schedule.max_iters=4",
        "schedule.log_interval=1", "schedule.eval_interval=2", "schedule.checkpoint_interval=4",
        "schedule.warmup_iters=2"])
    trainer.train(cfg, base / "work", env=DistEnv(), progress=False)
    return base / "work"


def test_plot_draws_loss_lr_and_validation_curves(run_dir, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(run_dir, work, ignore=shutil.ignore_patterns("*.pth"))
    records = read_metrics_log(work / "metrics.jsonl")
    assert [(r["mode"], r["iter"]) for r in records] == [
        ("train", 1), ("train", 2), ("val", 2), ("train", 3), ("train", 4), ("val", 4)]
    assert main(["plot", str(work)]) == 0
    printed = capsys.readouterr().out.split()
    expected = [work / "plots" / f"{name}.png" for name in ("loss", "lr", "val")]
    assert [Path(p) for p in printed] == expected
    for path in expected:
        assert_picture(path)


def test_plot_out_dir_and_log_file_argument(run_dir, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["plot", str(run_dir / "metrics.jsonl"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "lr.png", "val.png"]
    assert not (run_dir / "plots").exists()  # nothing next to the log


def test_a_resumed_run_keeps_the_last_record_of_each_iteration(tmp_path):
    first = MetricLogger(tmp_path, enabled=True)
    for step in (1, 2, 3):
        first.log(step, "train", {"loss": 3.0 - step, "lr": 0.1})
    first.close()
    resumed = MetricLogger(tmp_path, enabled=True)  # continued from a checkpoint at 2
    resumed.log(3, "train", {"loss": 0.5, "lr": 0.1})
    resumed.log(3, "val", {"mIoU": 12.5})
    resumed.close()
    records = read_metrics_log(tmp_path / "metrics.jsonl")
    assert metric_series(records, "train")["loss"] == ([1, 2, 3], [2.0, 1.0, 0.5])
    assert metric_series(records, "val") == {"mIoU": ([3], [12.5])}


def test_missing_log_is_named(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere' / 'metrics.jsonl'} does not exist" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("damage", "message"), [
    (lambda lines: [*lines, '{"mode": "train", "iter": 5, "loss": '],
     "line 7: not valid JSON"),
    (lambda lines: [lines[0], "", *lines[1:]], "line 2: empty line"),
    (lambda lines: [*lines[:3], '{"mode": "train", "loss": 1.0}', *lines[3:]],
     "line 4: a record is an object with a 'mode' string and an 'iter' integer"),
])
def test_a_damaged_line_is_named_with_file_and_number(run_dir, tmp_path, capsys, damage,
                                                      message):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(damage(lines)) + "\n")
    assert main(["plot", str(tmp_path)]) == 1
    assert f"{log}, {message}" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_an_empty_log_or_one_without_values_is_an_error(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text("")
    assert main(["plot", str(tmp_path)]) == 1
    assert f"{log} holds no records" in capsys.readouterr().err
    log.write_text('{"mode": "train", "iter": 1, "note": "text only"}\n')
    assert main(["plot", str(tmp_path)]) == 1
    assert f"{log}: the records hold no loss" in capsys.readouterr().err


def test_without_matplotlib_plot_says_what_to_install(run_dir, tmp_path, monkeypatch,
                                                      capsys):
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when not installed
    assert main(["plot", str(run_dir), "--out", str(tmp_path)]) == 1
    assert "pip install 'denseclip[plot]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
