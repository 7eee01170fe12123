"""Guards around a training run, each self-contained: a graceful stop on SIGTERM / SIGINT /
SIGUSR1 (:class:`GracefulStop`), one training per work dir (:func:`lock_work_dir`), the
clean-up of interrupted checkpoint writes (:func:`remove_stale_temporaries`), checkpoint
retention (:func:`prune_checkpoints`) and the settings that may change on resume
(:func:`resume_config`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, config_from_dict
from ..dist import DistEnv, all_reduce_max, broadcast_object
from ..weights.atomic import TEMP_PATTERN
from ..weights.resolver import CHECKPOINT_NAME, training_checkpoints

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

KEPT_NAMES = ("latest.pth", "best.pth")  # never pruned
LOCK_NAME = ".lock"
# SIGUSR1: what cluster schedulers (Slurm --signal, ...) send ahead of a preemption.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# Settings a resumed run may change: none of them alters what a step computes. A key
# ending in "." covers its whole section.
RESUMABLE = (
    "name",  # a label
    "schedule.max_iters", "schedule.max_epochs",  # train longer (poly lr follows)
    "schedule.checkpoint_interval", "schedule.eval_interval", "schedule.log_interval",
    "schedule.keep_checkpoints", "schedule.save_model",
    "log.",  # where metrics are reported
    "evaluation.",  # how validation runs, not training
    "precision",  # inference only
    "data.num_workers",  # augmentation seeds depend on the sample's position only
    "nonfinite_loss",  # what to do about a step that never happens in a healthy run
)


class TrainingStopped(Exception):
    """Training stopped on a signal after a whole step, with a checkpoint written;
    ``exit_code`` is 128 + the signal's number (130 SIGINT, 143 SIGTERM, 138 SIGUSR1)."""

    def __init__(self, signum: int, checkpoint: Path, iteration: int) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.iteration = iteration
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration "
                         f"{iteration}: checkpoint {checkpoint} written; continue with --resume")


class GracefulStop:
    """Context manager: while active, SIGTERM, SIGINT and SIGUSR1 only ask the training to
    stop (a second one stops at once, the usual way); :meth:`poll` says whether to. The
    previous handlers are restored on exit. Outside the main thread it installs nothing, and
    a signal the process ignores stays ignored."""

    def __init__(self, announce: bool = True, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.announce = announce
        self.signals = signals
        self.received = 0  # the signal's number, 0 for none
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. background jobs' SIGINT
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received:  # asked twice: stop now with the previous behaviour
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        if self.announce:  # os.write: print() may be in the middle of a write to stdout
            os.write(2, f"\n{signal.Signals(signum).name} received: stopping after this "
                        f"iteration with a checkpoint (send it again to stop at once)\n"
                     .encode())

    def poll(self, env: DistEnv) -> int:
        """The signal to stop on (0: go on). Under torchrun every rank must call it at the
        same point; a signal received by any rank stops them all there."""
        if env.distributed:
            self.received = all_reduce_max(self.received, env.device)
        return self.received


class WorkDirBusyError(RuntimeError):
    """Another process is training in the work dir."""


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _command() -> str:
    """This process's command line, shortened (``python -m denseclip`` shows as denseclip)."""
    prog = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = prog.parent.name if prog.name == "__main__.py" else prog.name
    return " ".join([name, *sys.argv[1:]])[:300]


@contextmanager
def lock_work_dir(work_dir: Path, env: DistEnv) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``work_dir/.lock`` (taken by the main process, the
    others follow its outcome) for the duration, with the holder's pid, host and command
    written into it; raise :class:`WorkDirBusyError` naming the holder if another process
    has it. The kernel releases the lock when the holder dies, however it dies."""
    handle = None
    error = None
    if env.is_main and fcntl is not None:
        path = work_dir / LOCK_NAME
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until the end
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            error = (f"{work_dir} is in use by another training ({_holder(handle.read())}); "
                     f"wait for it to end, stop it, or use another --work-dir")
            handle.close()
            handle = None
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "command": _command()}))
            handle.flush()
    error = broadcast_object(error) if env.distributed else error
    if error:
        raise WorkDirBusyError(error)
    try:
        yield
    finally:
        if handle is not None:
            handle.seek(0)
            handle.truncate()  # no stale holder left in a free lock file
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def remove_stale_temporaries(work_dir: Path) -> list[Path]:
    """Delete the temporaries that interrupted checkpoint writes left in ``work_dir``
    (``.iter_N.pth.XXXXXXXX.tmp`` and the like; nothing else). Call it holding the lock."""
    removed = []
    for path in work_dir.iterdir():
        m = TEMP_PATTERN.match(path.name)
        if m and (CHECKPOINT_NAME.match(m["name"]) or m["name"] in KEPT_NAMES) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def prune_checkpoints(work_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``iter_N.pth`` of ``work_dir`` (``keep`` <= 0:
    none); ``latest.pth``/``best.pth`` are never touched. Returns the deleted files."""
    if keep <= 0:
        return []
    doomed = training_checkpoints(work_dir)[:-keep]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: a config dict (``Config.to_dict``) as its
    dotted keys, the names overrides use (an empty section stays one value)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def resume_config(saved: Config, requested: Config, source: str) -> tuple[Config, list[str]]:
    """The config to resume ``source`` (a checkpoint) with: ``saved`` (the checkpoint's)
    with the :data:`RESUMABLE` settings of ``requested`` that differ, plus one
    ``key old → new`` line per change. Any other difference raises :class:`ConfigError`
    listing both values."""
    old, new = flatten(saved.to_dict()), flatten(requested.to_dict())
    if requested.schedule.max_epochs > 0:  # max_iters is derived from the epochs
        new["schedule.max_iters"] = old.get("schedule.max_iters")
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    refused = [k for k in changed if not _resumable(k)]
    if refused:
        shown = "; ".join(f"{k} is {old.get(k)!r} in the checkpoint, {new.get(k)!r} requested"
                          for k in refused[:8])
        more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
        allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUMABLE)
        raise ConfigError(
            f"cannot resume {source} with a different config: {shown}{more}. Only {allowed} "
            f"may change on resume; to train with these settings start a new --work-dir "
            f"(--load-from {source} initialises it with these weights)")
    data = saved.to_dict()
    for key in changed:
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = new[key]
    lines = [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in changed]
    return config_from_dict(data, source), lines
