"""Experiment trackers: where a training's metrics stream goes besides ``metrics.jsonl``,
chosen by ``log.backends``.

Each tracker is a hook of :class:`~.trainer.Trainer` on the main process: ``before_train``
records the resolved config, :meth:`Tracker.log_metrics` receives every record written to
``metrics.jsonl`` (the same ``mode``, iteration and values, as ``mode/key`` series), and
``after_train`` records the model card of ``work_dir/model/`` when the run wrote one, then
closes the run.

* ``tensorboard`` (the default): event files in ``work_dir/tb``, the config and the card as
  text.
* ``mlflow`` (extra ``denseclip[mlflow]``): a run in ``log.mlflow_experiment`` of the store
  at ``log.mlflow_uri``, by default a file store in ``work_dir/mlruns``; the flattened config
  as parameters and ``config.yaml``, the card as ``model/README.md`` artifacts.
* ``wandb`` (extra ``denseclip[wandb]``): a run of ``log.wandb_project`` under
  ``work_dir/wandb`` (or ``$WANDB_DIR``), offline unless an API key is configured
  (``log.wandb_mode``); the config as the run's config and ``denseclip_config.yaml``, the
  card as ``model_card.md``.
"""

from __future__ import annotations

import math
import netrc
import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import yaml
from torch.utils.tensorboard import SummaryWriter

from ..config import Config, ConfigError
from ..optional import require
from .guard import flatten
from .hooks import HookBase

__all__ = ["MLflowTracker", "TensorBoardTracker", "Tracker", "WandbTracker", "build_trackers"]

PURPOSE = "the {} entry of log.backends"


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker(HookBase):
    """One experiment-tracking backend. Subclasses implement :meth:`start` (open the run
    and record the config), :meth:`log_metrics`, :meth:`log_card` and :meth:`finish`;
    :meth:`close` is safe to call again (the trainer calls it also after a failure)."""

    name: ClassVar[str]

    def __init__(self, cfg: Config, work_dir: Path) -> None:
        self.cfg, self.work_dir = cfg, Path(work_dir)
        self.open = False

    def before_train(self) -> None:
        self.start(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.open = True

    def after_train(self) -> None:
        t = self.trainer
        saved = getattr(t, "saved_model", None)
        if self.open and saved is not None and (Path(saved) / "README.md").is_file():
            self.log_card(Path(saved) / "README.md", t.iteration)
        self.close(status="FINISHED" if getattr(t, "finished", False) else
                   "KILLED" if getattr(t, "stop_signal", 0) else "FAILED")

    def close(self, status: str = "FAILED") -> None:
        """End the run with ``status`` (FINISHED, KILLED or FAILED) once."""
        if self.open:
            self.open = False
            self.finish(status)

    def start(self, config_yaml: str) -> None:
        raise NotImplementedError

    def log_metrics(self, step: int, mode: str, values: dict[str, Any]) -> None:
        """One record of ``metrics.jsonl``: its finite numbers as ``mode/key`` at ``step``."""
        raise NotImplementedError

    def log_card(self, card: Path, step: int) -> None:
        raise NotImplementedError

    def finish(self, status: str) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """TensorBoard event files in ``work_dir/tb``."""

    name = "tensorboard"

    def start(self, config_yaml: str) -> None:
        self.writer = SummaryWriter(str(self.work_dir / "tb"))
        self.writer.add_text("config", _markdown_code(config_yaml), self.trainer.iteration)

    def log_metrics(self, step: int, mode: str, values: dict[str, Any]) -> None:
        if self.open:
            for key, value in _finite(values).items():
                self.writer.add_scalar(f"{mode}/{key}", value, step)

    def log_card(self, card: Path, step: int) -> None:
        self.writer.add_text("model_card", card.read_text(encoding="utf-8"), step)

    def finish(self, status: str) -> None:
        self.writer.close()


def _markdown_code(text: str) -> str:
    """``text`` as a Markdown code block (TensorBoard renders text as Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


class MLflowTracker(Tracker):
    """A run of ``log.mlflow_experiment`` in the MLflow store at ``log.mlflow_uri`` (default:
    the file store ``work_dir/mlruns``), through MLflow's client (no global active run)."""

    name = "mlflow"
    BATCH = 100  # MLflow's limit on parameters per log_batch call

    def __init__(self, cfg: Config, work_dir: Path) -> None:
        super().__init__(cfg, work_dir)
        self.mlflow = require("mlflow.tracking", PURPOSE.format("mlflow"))
        self.entities = require("mlflow.entities", PURPOSE.format("mlflow"))
        self.uri = cfg.log.mlflow_uri or (self.work_dir / "mlruns").resolve().as_uri()

    def start(self, config_yaml: str) -> None:
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its file store behind this opt-in; the store is what we ask for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = self.client = self.mlflow.MlflowClient(tracking_uri=self.uri)
        name = self.cfg.log.mlflow_experiment
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else client.create_experiment(name)
        t = self.trainer
        tags = {"denseclip.work_dir": str(self.work_dir.resolve()),
                "denseclip.start_iteration": str(t.iteration)}
        self.run_id = client.create_run(experiment, run_name=self.cfg.name, tags=tags).info.run_id
        params = [self.entities.Param(k, str(v)[:6000])
                  for k, v in flatten(self.cfg.to_dict()).items()]
        for i in range(0, len(params), self.BATCH):
            client.log_batch(self.run_id, params=params[i:i + self.BATCH])
        client.log_text(self.run_id, config_yaml, "config.yaml")

    def log_metrics(self, step: int, mode: str, values: dict[str, Any]) -> None:
        if self.open:
            metrics = [self.entities.Metric(f"{mode}/{k}", v, _now_ms(), step)
                       for k, v in _finite(values).items()]
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_card(self, card: Path, step: int) -> None:
        self.client.log_text(self.run_id, card.read_text(encoding="utf-8"), "model/README.md")

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _now_ms() -> int:
    return int(time.time() * 1000)


def wandb_logged_in(environ: dict[str, str] | None = None) -> bool:
    """Whether W&B has an API key without asking its server: ``$WANDB_API_KEY``, or a
    netrc entry (``$NETRC`` or ``~/.netrc``) for the host of ``$WANDB_BASE_URL``."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    path = env.get("NETRC") or str(Path("~/.netrc").expanduser())
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(Tracker):
    """A W&B run of ``log.wandb_project``: offline (files under ``work_dir/wandb``, to
    ``wandb sync`` later) unless an API key is configured or ``log.wandb_mode`` says
    otherwise; ``$WANDB_MODE`` wins over ``auto``."""

    name = "wandb"

    def __init__(self, cfg: Config, work_dir: Path) -> None:
        super().__init__(cfg, work_dir)
        self.wandb = require("wandb", PURPOSE.format("wandb"))

    def mode(self) -> str | None:
        """The mode passed to ``wandb.init`` (None: ``$WANDB_MODE`` decides)."""
        chosen = self.cfg.log.wandb_mode
        if chosen != "auto":
            return chosen
        if os.environ.get("WANDB_MODE"):
            return None
        return "online" if wandb_logged_in() else "offline"

    def start(self, config_yaml: str) -> None:
        wandb = self.wandb
        directory = None if os.environ.get("WANDB_DIR") else str(self.work_dir)
        self.run = wandb.init(project=self.cfg.log.wandb_project, name=self.cfg.name,
                              dir=directory, mode=self.mode(), config=self.cfg.to_dict(),
                              settings=wandb.Settings(console="off"))
        saved = Path(self.run.dir) / "denseclip_config.yaml"
        saved.write_text(config_yaml, encoding="utf-8")
        self.run.save(str(saved), base_path=self.run.dir, policy="now")

    def log_metrics(self, step: int, mode: str, values: dict[str, Any]) -> None:
        if self.open:
            self.run.log({f"{mode}/{k}": v for k, v in _finite(values).items()}, step=step)

    def log_card(self, card: Path, step: int) -> None:
        target = Path(self.run.dir) / "model_card.md"
        shutil.copyfile(card, target)
        self.run.save(str(target), base_path=self.run.dir, policy="now")

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


TRACKERS: dict[str, type[Tracker]] = {
    cls.name: cls for cls in (TensorBoardTracker, MLflowTracker, WandbTracker)}


def build_trackers(cfg: Config, work_dir: Path) -> list[Tracker]:
    """The trackers of ``cfg.log.backends`` (each once, in order). A backend whose package
    is missing raises :class:`~denseclip.config.ConfigError` naming the extra to install."""
    trackers = []
    for name in dict.fromkeys(cfg.log.backends):
        try:
            trackers.append(TRACKERS[name](cfg, work_dir))
        except ImportError as e:
            raise ConfigError(str(e), "log.backends") from None
    return trackers
