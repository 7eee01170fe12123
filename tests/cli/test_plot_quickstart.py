"""The quickstart's evaluation is in its metrics.jsonl, so ``denseclip plot`` draws
``val.png``; a figure that cannot be drawn is named with the reason."""

from __future__ import annotations

import json

from denseclip.cli import main
from denseclip.evaluation.plots import skipped_figures


def test_quickstart_logs_its_evaluation_and_plot_draws_it(tmp_path, capsys):
    work = tmp_path / "qs"
    assert main(["quickstart", "--work-dir", str(work), "--num-train", "4", "--num-val", "2",
                 "--no-progress", "schedule.max_iters=2", "schedule.checkpoint_interval=2",
                 "schedule.log_interval=1", "data.num_workers=0", "data.batch_size=2"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["mode"] == "val"]
    assert [r["iter"] for r in val] == [2]  # one evaluation, at the last step
    assert f"validation mIoU {val[0]['mIoU']:.2f} %" in out.splitlines()[-1]
    assert main(["plot", str(work)]) == 0
    captured = capsys.readouterr()
    assert (work / "plots" / "val.png").stat().st_size > 1000
    assert str(work / "plots" / "val.png") in captured.out.split()
    assert "skipped" not in captured.err


def test_plot_names_each_skipped_figure_and_why(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"mode": "train", "iter": i, "loss": 1.0 / i}) + "\n"
                           for i in (1, 2, 3)))
    assert main(["plot", str(log), "--out", str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(tmp_path / "p" / "loss.png")]
    skipped = [line for line in captured.err.splitlines() if "skipped" in line]
    assert skipped[0] == "denseclip plot: skipped lr.png: no learning rate was logged"
    assert skipped[1].startswith("denseclip plot: skipped val.png: the log has no evaluation")
    assert "schedule.eval_interval=0" in skipped[1] and len(skipped) == 2


def test_skipped_figures_of_a_complete_log_is_empty():
    records = [{"mode": "train", "iter": 1, "loss": 1.0, "lr": 0.1},
               {"mode": "val", "iter": 1, "mIoU": 50.0},
               {"mode": "test", "iter": 1, "mIoU": float("nan")}]
    assert skipped_figures(records) == [("test.png", "no finite value in the 'test' records")]
    assert skipped_figures(records[:2]) == []
