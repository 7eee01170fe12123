"""Experiment tracking: a real training logs to TensorBoard, an MLflow file store and an
offline W&B run, and each is read back with its own library (MLflow's client, TensorBoard's
event reader, W&B's record protobufs) to find the resolved config, the same records as
``metrics.jsonl`` and the model card. A bad backend name and a missing package are one-line
errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

import denseclip
from denseclip.cli import main
from denseclip.config import ConfigError
from denseclip.data import make_synthetic_dataset
from denseclip.dist import DistEnv
from denseclip.engine import trainer
from denseclip.engine.hooks import HookBase
from denseclip.engine.trackers import wandb_logged_in
from tests.engine.test_training import ENV, overrides


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=6, num_val=2,
                                  size=(64, 80), seed=0)


@pytest.fixture()
def offline(tmp_path, monkeypatch) -> None:
    """No tracking server is reached and nothing is written outside ``tmp_path``: no W&B
    key or mode set (so the tracker picks offline itself), no telemetry."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL",
                 "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("NETRC", str(home / ".netrc"))  # does not exist: not logged in
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def config(root: Path, *extra: str):
    return denseclip.load_config("tiny_denseclip_res", overrides(root, *extra))


def jsonl(work: Path, mode: str, key: str) -> dict[int, float]:
    lines = map(json.loads, (work / "metrics.jsonl").read_text().splitlines())
    return {x["iter"]: x[key] for x in lines if x["mode"] == mode}


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: W&B's LevelDB-style log (a 7-byte ``:W&B`` header,
    then 32 KiB blocks of chunks with a 7-byte header: checksum, length, type 1 full /
    2 first / 3 middle / 4 last), each record a ``wandb_internal_pb2.Record``."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_mlflow_wandb_and_tensorboard_hold_the_config_metrics_and_card(tmp_path, data_root,
                                                                        offline):
    work = tmp_path / "w"
    cfg = config(data_root, "schedule.max_iters=2", "schedule.eval_interval=2",
                 "log.backends=[tensorboard,mlflow,wandb]")
    trainer.train(cfg, work, env=DistEnv(), progress=False)
    resolved = yaml.safe_load((work / "config.yaml").read_text())
    card = (work / "model/README.md").read_text()
    losses, mious = jsonl(work, "train", "loss"), jsonl(work, "val", "mIoU")
    assert sorted(losses) == [1, 2] and sorted(mious) == [2]

    # MLflow: the file store in work_dir/mlruns, read with MLflow's client
    client = MlflowClient(tracking_uri=(work / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("denseclip")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.name
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    assert run.data.params["log.backends"] == "['tensorboard', 'mlflow', 'wandb']"
    got = yaml.safe_load(Path(client.download_artifacts(
        run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert got == resolved
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == losses
    history = client.get_metric_history(run.info.run_id, "val/mIoU")
    assert {m.step: m.value for m in history} == mious
    assert Path(client.download_artifacts(run.info.run_id, "model/README.md",
                                          str(tmp_path))).read_text() == card

    # W&B: an offline run under work_dir/wandb, its records read with W&B's protobufs
    (run_dir,) = (work / "wandb").glob("offline-run-*")
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.project == "denseclip" and started.display_name == cfg.name
    config_items = {u.key: json.loads(u.value_json) for u in started.config.update}
    assert {k: v for k, v in config_items.items() if k != "_wandb"} == resolved
    rows: dict[int, dict[str, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in r.history.item}
            rows[items["_step"]] = items
    assert {s: row["train/loss"] for s, row in rows.items()} == losses
    assert {s: row["val/mIoU"] for s, row in rows.items() if "val/mIoU" in row} == mious
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files"
             for f in r.files.files}
    assert {"denseclip_config.yaml", "model_card.md"} <= saved
    assert (run_dir / "files/model_card.md").read_text() == card
    assert yaml.safe_load((run_dir / "files/denseclip_config.yaml").read_text()) == resolved

    # TensorBoard: scalars and the config and card as text
    events = EventAccumulator(str(work / "tb"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses)
    assert {"config/text_summary", "model_card/text_summary"} <= set(events.Tags()["tensors"])


class FailAt(HookBase):
    def after_step(self) -> None:
        if self.trainer.iteration == 1:
            raise RuntimeError("hook failed at iteration 1")


def test_a_failed_run_is_marked_failed_and_tensorboard_alone_is_the_default(tmp_path,
                                                                              data_root,
                                                                              offline):
    work = tmp_path / "fail"
    cfg = config(data_root, "schedule.max_iters=3", "schedule.eval_interval=0",
                 "log.backends=[mlflow]")
    with pytest.raises(RuntimeError, match="hook failed"):
        trainer.train(cfg, work, env=DistEnv(), progress=False, hooks=[FailAt()])
    client = MlflowClient(tracking_uri=(work / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("denseclip").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    assert not (work / "tb").exists() and not (work / "model").exists()

    plain = tmp_path / "plain"
    trainer.train(config(data_root, "schedule.max_iters=1", "schedule.eval_interval=0"),
                  plain, env=DistEnv(), progress=False)
    assert (plain / "tb").is_dir()
    assert not (plain / "mlruns").exists() and not (plain / "wandb").exists()


def test_an_unknown_backend_is_a_config_error_listing_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"log\.backends\[1\]: 'neptune' is not one of "
                                          r"'tensorboard', 'mlflow', 'wandb'"):
        denseclip.load_config("tiny_denseclip_res", ["log.backends=[tensorboard,neptune]"])
    assert main(["train", "tiny_denseclip_res", "--work-dir", str(tmp_path / "w"),
                 "log.backends=[neptune]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'neptune' is not one of 'tensorboard', 'mlflow', 'wandb'" in err
    assert len(err.splitlines()) == 1


def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, data_root):
    # the CLI in a process where `import wandb` fails as it does when wandb is not installed
    args = ["train", "tiny_denseclip_res", "--work-dir", str(tmp_path / "w"), "--no-progress",
            *overrides(data_root, "schedule.max_iters=1", "log.backends=[wandb]")]
    code = ("import sys; sys.modules['wandb'] = None; from denseclip.cli import main; "
            f"sys.exit(main({args!r}))")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                          text=True, timeout=300)
    err = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(err) == 1 and err[0].endswith(
        "error: wandb is needed for the wandb entry of log.backends: pip install "
        "'denseclip[wandb]'"), done.stderr
    assert not list((tmp_path / "w").glob("*.pth"))


def test_wandb_login_is_found_without_asking_its_server(tmp_path):
    netrc = tmp_path / "netrc"
    assert not wandb_logged_in({"NETRC": str(netrc)})  # no file
    netrc.write_text("machine example.org login user password secret\n")
    netrc.chmod(0o600)
    assert not wandb_logged_in({"NETRC": str(netrc)})
    assert wandb_logged_in({"NETRC": str(netrc), "WANDB_BASE_URL": "https://example.org"})
    assert wandb_logged_in({"NETRC": str(netrc), "WANDB_API_KEY": "k"})
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_logged_in({"NETRC": str(netrc)})
