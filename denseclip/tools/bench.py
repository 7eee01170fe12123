"""Speed and memory of a config's model in fp32 and in the fast mode, side by side in one
process and one run (``denseclip bench``).

One model object is built once (``torch.manual_seed(0)``) and measured in each *mode*:

* ``fp32`` — fp32 with the reference kernels, weights in contiguous NCHW: the plain
  computation, the baseline;
* ``fp32_fast`` — fp32 with the fast kernels (weights in ``channels_last``);
* ``fast`` — the fast precision (``precision``, default the config's, ``auto``: the
  fastest one the hardware runs natively, :func:`denseclip.runtime.resolve_precision`)
  with the fast kernels; training autocasts through :func:`denseclip.runtime.run_mode`
  and, in fp16, scales the loss with ``torch.amp.GradScaler`` as the trainer does;
* ``compiled`` (only when asked) — the fast mode through ``torch.compile`` (backend
  ``cfg.compile_backend``); its first call (the compilation) is timed separately from the
  steady state;
* ``int8`` (unless ``int8=False``) — the model quantised to int8 and run by ONNX Runtime
  (:mod:`denseclip.inference.int8`), calibrated on the measured batch's own images (the
  weights are random anyway); eval forward and sliding-window test only (int8 is
  inference only: its training step is ``null``), the quantisation's time as
  ``int8_prepare_s``. Where it does not apply (detection, a GPU, onnxruntime missing) its
  figures are ``null`` and ``int8_note`` says why.

:func:`prepare_model` switches the weights' memory format between modes. In each mode the
model is called as a user calls it: an eval forward under ``torch.no_grad()`` (segmentors
``model(images)`` with a ``B×3×H×W`` batch of normal noise; detectors ``model(images)``
with a list of ``3×H×W`` images in 0..1) and one full training step (``zero_grad``,
forward with random targets, backward, ``optimizer.step()``) with a fresh optimiser from
:func:`denseclip.engine.optim.build_optimizer` (fused AdamW with the fast kernels, as the
trainer builds it), dropped after the mode so no state carries over. Timing: ``warmup``
untimed calls, then the median of ``repeats`` timed calls (``time.perf_counter``; on CUDA
after ``torch.cuda.synchronize``).

Peak memory per mode: on CUDA the peak allocated by PyTorch (``max_memory_allocated``
after ``reset_peak_memory_stats``); on CPU the process's resident set size sampled every
2 ms by a background thread (:class:`RSSSampler`: ``/proc/self/statm`` × page size, or
``getrusage``'s max RSS where ``/proc`` is missing). RSS includes the model, the inputs
and whatever the allocator keeps from earlier modes, so it is an upper bound of a mode's
own needs. The process's overall ``ru_maxrss`` is reported too.

Segmentors also get the sliding-window test of one ADE20K-sized image (512×683, rescaled to
``data.test_scale`` as the test pipeline does, then the model's own inference with
``cfg.evaluation``) in fp32 and in the fast mode, and every preset the throughput of its
training data pipeline in one worker (one intra-op thread) on generated JPEGs written in
the dataset's layout: ADE20K-sized (683×512 and 512×683) for segmentation, COCO-sized
(640×480 and 480×640, with boxes and polygons) for detection.

:func:`run_benchmark` returns the figures as a dict (the ``--json`` line of the command;
:mod:`denseclip.cli.bench` renders it as a table).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config, ConfigError
from ..data.generated import ADE20K_IMAGE
from ..engine.optim import build_optimizer
from ..inference.int8 import Calibration, quantize_model
from ..models.seg_inference import slide_windows
from ..optional import require
from ..runtime import prepare_model, resolve_precision, run_mode
from ..tasks import build_model, get_task
from ..utils import keep_ratio_size

__all__ = ["ADE20K_IMAGE", "MIN_SIZE", "BenchOptions", "RSSSampler", "check_options",
           "current_rss_bytes", "default_size", "device_description", "make_inputs",
           "max_rss_bytes",
           "measurement_labels", "mode_settings", "peak_memory", "pipeline_speed", "ratio",
           "run_benchmark", "slide_image_size", "time_calls"]

_log = logging.getLogger(__name__)

MIN_SIZE = 32  # smallest input side (one stride-32 feature cell)
SAMPLE_INTERVAL_S = 0.002
GIB = 2**30
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class BenchOptions:
    """What :func:`run_benchmark` measures (``None``: the defaults described there)."""

    size: Sequence[int] | None = None  # (H, W); default: default_size(cfg)
    batch: int = 2
    device: str | None = None  # default: cuda if available, else cpu
    precision: str | None = None  # the fast mode's; default: the config's (auto)
    repeats: int = 3
    warmup: int = 1
    compile: bool = False
    train: bool = True
    slide: bool = True
    pipeline: bool = True
    pipeline_images: int = 16
    int8: bool = True


# ------------------------------------------------------------------ memory
def max_rss_bytes() -> int:
    """The process's peak resident set size so far (``getrusage``'s ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes vs KiB


def current_rss_bytes() -> int:
    """The process's resident set size now (``/proc/self/statm``; where that is missing,
    the peak so far from ``getrusage``)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return max_rss_bytes()


class RSSSampler:
    """Peak resident set size (bytes, :attr:`peak`) while the context is open: sampled on
    entry, every ``interval`` seconds by a background thread, on each :meth:`sample` call
    and on exit."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.interval = interval
        self.peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Read the RSS now, fold it into :attr:`peak` and return it."""
        rss = current_rss_bytes()
        with self._lock:
            self.peak = max(self.peak, rss)
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RSSSampler:
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="denseclip-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Yields a dict that holds ``bytes`` after the block: CUDA's peak allocated memory
    on a GPU, the sampled peak RSS (:class:`RSSSampler`) elsewhere."""
    out: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        with RSSSampler() as sampler:
            yield out
        out["bytes"] = sampler.peak


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA peak allocated (torch.cuda.max_memory_allocated) per mode"
    return (f"process RSS sampled every {SAMPLE_INTERVAL_S * 1e3:g} ms during each mode "
            f"(/proc/self/statm, else getrusage)")


# ------------------------------------------------------------------ devices and timing
def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and PyTorch's intra-op thread count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                name = value.strip()
                break
    return f"{device.type} ({name}, {torch.get_num_threads()} threads)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device,
               first_separately: bool = False) -> dict[str, Any]:
    """``{"median", "times", "first"}`` in seconds: ``fn`` called ``warmup`` times
    untimed, then ``repeats`` times timed. With ``first_separately`` (compilation), one
    call before the warm-up is timed on its own as ``first`` (else None)."""
    first = None
    if first_separately:
        start = time.perf_counter()
        fn()
        _synchronize(device)
        first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "times": times, "first": first}


# ------------------------------------------------------------------ configuration
def default_size(cfg: Config) -> tuple[int, int]:
    """The input size measured unless one is given: ``data.crop_size`` for segmentors;
    ``(detection.min_size, detection.max_size)`` for detectors (800×1333 for the official
    presets: the scale they resize to)."""
    return get_task(cfg).bench_size()


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


def check_options(cfg: Config, opts: BenchOptions) -> tuple[tuple[int, int], torch.device]:
    """The (H, W) and device ``opts`` mean; :class:`ConfigError` for bad values."""
    size = tuple(int(s) for s in opts.size) if opts.size else default_size(cfg)
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise ConfigError(f"input size must be two integers H W of at least {MIN_SIZE}, "
                          f"got {list(size)}")
    for name, value, low in (("batch", opts.batch, 1), ("repeats", opts.repeats, 1),
                             ("warmup", opts.warmup, 0),
                             ("pipeline images", opts.pipeline_images, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    return (size[0], size[1]), resolve_device(opts.device)


def mode_settings(fast_precision: str, compile: bool = False) -> dict[str, tuple[str, str]]:
    """Mode name → (precision, kernels), in the order measured."""
    modes = {"fp32": ("fp32", "reference"), "fp32_fast": ("fp32", "fast"),
             "fast": (fast_precision, "fast")}
    if compile:
        modes["compiled"] = (fast_precision, "fast")
    return modes


def measurement_labels(cfg: Config, opts: BenchOptions) -> list[str]:
    """What :func:`run_benchmark` measures, in order (one progress step each)."""
    labels = []
    for mode in mode_settings("fast", opts.compile):
        labels.append(f"{mode} eval forward")
        if opts.train:
            labels.append(f"{mode} train step")
    int8 = opts.int8 and int8_applies(cfg)
    if int8:
        labels.append("int8 eval forward")
    if opts.slide and get_task(cfg).slide_inference:
        labels += ["fp32 slide inference", "fast slide inference"]
        if int8:
            labels.append("int8 slide inference")
    if opts.pipeline:
        labels.append("data pipeline")
    return labels


# ------------------------------------------------------------------ inputs
def make_inputs(cfg: Config, num_classes: int, size: Sequence[int], batch: int,
                device: torch.device, seed: int = 0) -> tuple[Any, Any]:
    """``(images, targets)`` as a user passes them to ``cfg``'s model
    (:meth:`~denseclip.tasks.Task.bench_inputs`)."""
    return get_task(cfg).bench_inputs(num_classes, size, batch, device, seed)


# ------------------------------------------------------------------ model measurements
def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_mode(name: str, model: nn.Module, cfg: Config, precision: str, kernels: str,
                  inputs: tuple[Any, Any], opts: BenchOptions, device: torch.device,
                  progress: Callable[[str], None]) -> dict[str, Any]:
    """Eval forward and training step of one mode, and its peak memory."""
    images, targets = inputs
    compiled = name == "compiled"
    prepare_model(model, kernels)
    net = torch.compile(model, backend=cfg.compile_backend) if compiled else model
    result: dict[str, Any] = {}
    with peak_memory(device) as mem:
        model.eval()

        def forward() -> None:
            with torch.no_grad(), run_mode(precision, kernels, device):
                net(images)

        progress(f"{name} eval forward")
        result["eval"] = time_calls(forward, opts.warmup, opts.repeats, device, compiled)
        if opts.train:
            model.train()
            optimizer = build_optimizer(model, cfg.optim, fused=kernels == "fast")
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                with run_mode(precision, kernels, device):
                    losses = net(images, targets)
                scaler.scale(sum(losses.values())).backward()
                scaler.step(optimizer)
                scaler.update()

            progress(f"{name} train step")
            result["train"] = time_calls(step, opts.warmup, opts.repeats, device, compiled)
            optimizer.zero_grad(set_to_none=True)
            del optimizer, scaler, step
            model.eval()
        _release(device)
    result["peak_bytes"] = mem["bytes"]
    _log.debug("bench %s: %s", name, {k: v["median"] if isinstance(v, dict) else v
                                       for k, v in result.items()})
    return result


def slide_image_size(cfg: Config) -> tuple[int, int]:
    """The ADE20K-sized image (:data:`ADE20K_IMAGE`) rescaled to ``data.test_scale``."""
    return keep_ratio_size(*ADE20K_IMAGE, cfg.data.test_scale)


def slide_window_count(cfg: Config) -> int:
    h, w = slide_image_size(cfg)
    ev = cfg.evaluation
    return len(slide_windows(h, w, ev.crop_size, ev.stride)) if ev.mode == "slide" else 1


def _measure_slide(name: str, model: nn.Module, cfg: Config, precision: str, kernels: str,
                   opts: BenchOptions, device: torch.device,
                   progress: Callable[[str], None]) -> float:
    """Seconds per image of the test-time inference (``cfg.evaluation``) of one
    ADE20K-sized image at the test scale, logits resized back to the original size."""
    h, w = slide_image_size(cfg)
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    prepare_model(model, kernels).eval()

    def infer() -> None:
        with run_mode(precision, kernels, device):
            model.inference(image, ADE20K_IMAGE)

    progress(f"{name} slide inference")
    return time_calls(infer, opts.warmup, opts.repeats, device)["median"]


# ------------------------------------------------------------------ int8
INT8_TRAIN_NOTE = "int8 is inference only (ONNX Runtime): no training step"


def int8_applies(cfg: Config) -> bool:
    """Whether ``cfg``'s model has an int8 mode (the trained segmentors)."""
    return get_task(cfg).onnx_export and not cfg.model.zeroshot


def _int8_unavailable(cfg: Config, device: torch.device) -> str | None:
    if not int8_applies(cfg):
        return f"int8 covers the trained segmentation models, not {cfg.name}"
    if device.type != "cpu":
        return f"int8 runs on CPUs, not {device}"
    try:
        require("onnxruntime", "int8 inference")
        require("onnx", "int8 inference")
    except ImportError as e:
        return str(e)
    return None


def _measure_int8(model: nn.Module, cfg: Config, images: torch.Tensor, opts: BenchOptions,
                  device: torch.device, progress: Callable[[str], None]
                  ) -> tuple[dict[str, Any], nn.Module]:
    """Quantise ``model`` (calibrated on ``images``, one at a time) and time its eval
    forward (peak memory: of the forward calls, not of the quantisation); returns the
    figures and the quantised model (for the sliding window)."""
    start = time.perf_counter()
    prepare_model(model, "reference").eval()
    batches = [images[i : i + 1].float().cpu().numpy() for i in range(len(images))]
    int8 = quantize_model(model, cfg, Calibration(cache=False), batches=batches)
    prepare_s = time.perf_counter() - start
    _release(device)
    with peak_memory(device) as mem:
        def forward() -> None:
            with torch.no_grad():
                int8(images)

        progress("int8 eval forward")
        timed = time_calls(forward, opts.warmup, opts.repeats, device)
        _release(device)
    return {"eval": timed, "prepare_s": prepare_s, "peak_bytes": mem["bytes"]}, int8


# ------------------------------------------------------------------ data pipeline
def pipeline_speed(cfg: Config, num_images: int = 16, seed: int = 0) -> float:
    """Images per second of ``cfg``'s training data pipeline (decode, augmentations,
    tensors) in one worker (one intra-op thread while measuring), on ``num_images``
    generated JPEGs written to a temporary folder in the dataset's layout (module
    docstring); one untimed item first."""
    rng = np.random.default_rng(seed)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="denseclip-bench-") as tmp:
        root = Path(tmp)
        dataset = get_task(cfg).bench_training_set(root, num_images, rng)
        torch.set_num_threads(1)
        try:
            dataset[(0, 0)]  # warm-up
            start = time.perf_counter()
            for i in range(num_images):
                dataset[(i % len(dataset), i + 1)]
            elapsed = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
    return num_images / elapsed


# ------------------------------------------------------------------ the whole run
def ratio(a: float, b: float) -> float:
    """``a / b`` (a speed-up of times ``a`` → ``b``); infinite for ``b = 0``."""
    return a / b if b > 0 else math.inf


def _int8_results(result: dict[str, Any], measured: dict[str, Any] | None, note: str,
                  keys: list[tuple[str, str]]) -> None:
    """Add the ``int8`` entries (``None`` where not measured) and ``int8_note``."""
    result["eval_forward_s"]["int8"] = None if measured is None else \
        measured["eval"]["median"]
    if "train_step_s" in result:
        result["train_step_s"]["int8"] = None
    result["peak_mem_gib"]["int8"] = None if measured is None else \
        measured["peak_bytes"] / GIB
    result["int8_prepare_s"] = None if measured is None else measured["prepare_s"]
    result["int8_note"] = note
    result["speedup_int8"] = {
        key: None if result[field]["int8"] is None
        else ratio(result[field]["fp32"], result[field]["int8"]) for key, field in keys}


def run_benchmark(cfg: Config, opts: BenchOptions | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``cfg``'s model in every mode (module docstring); ``progress`` is called
    with each label of :func:`measurement_labels` as that measurement starts.

    Returns ``{"preset", "task", "device", "precision" (the fast mode's), "size", "batch",
    "repeats", "warmup", "eval_forward_s": {mode: s}, "train_step_s": {mode: s},
    "peak_mem_gib": {mode: GiB}, "peak_mem_method", "peak_rss_gib",
    "slide_s_per_image": {"fp32", "fast", "windows"}, "pipeline_images_per_s_per_worker",
    "pipeline_data" (what the generated images imitate), "speedup": {"eval_forward",
    "train_step"} (fp32 / fast), "speedup_fp32_fast": {…} (fp32 / fp32_fast)}``, with
    ``"compile_s": {"eval_forward", "train_step"}`` (the first calls) under ``compile``;
    under ``int8`` the mode ``int8`` in the per-mode dicts (``None`` where it does not
    apply, always for the training step), ``slide_s_per_image["int8"]``,
    ``"speedup_int8": {…}`` (fp32 / int8, ``None`` where not measured),
    ``"int8_prepare_s"`` (export, calibration and quantisation) and ``"int8_note"``;
    times are seconds per call (per batch, for the model).
    Parts not measured (``train``, ``slide``, ``pipeline`` off, or slide for detectors)
    are left out. Raises :class:`ConfigError` for a bad size, count or device."""
    opts = opts or BenchOptions()
    progress = progress or (lambda label: None)
    size, device = check_options(cfg, opts)
    try:
        fast = resolve_precision(opts.precision or cfg.precision, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    inputs = make_inputs(cfg, model.num_classes, size, opts.batch, device)
    modes = mode_settings(fast, opts.compile)
    measured = {name: _measure_mode(name, model, cfg, precision, kernels, inputs, opts,
                                    device, progress)
                for name, (precision, kernels) in modes.items()}
    result: dict[str, Any] = {
        "preset": cfg.name, "task": cfg.model.task, "device": device_description(device),
        "torch": torch.__version__, "precision": fast, "size": list(size),
        "batch": opts.batch, "repeats": opts.repeats, "warmup": opts.warmup,
        "eval_forward_s": {m: r["eval"]["median"] for m, r in measured.items()},
    }
    keys = [("eval_forward", "eval_forward_s")]
    if opts.train:
        result["train_step_s"] = {m: r["train"]["median"] for m, r in measured.items()}
        keys.append(("train_step", "train_step_s"))
    result["peak_mem_gib"] = {m: r["peak_bytes"] / GIB for m, r in measured.items()}
    result["peak_mem_method"] = memory_method(device)
    if opts.compile:
        result["compile_s"] = {key: measured["compiled"][part]["first"]
                               for key, part in (("eval_forward", "eval"),
                                                 ("train_step", "train")) if part in
                               measured["compiled"]}
    int8_measured = int8_model = None
    if opts.int8:
        note = _int8_unavailable(cfg, device)
        if note is None:
            int8_measured, int8_model = _measure_int8(model, cfg, inputs[0], opts, device,
                                                      progress)
            note = INT8_TRAIN_NOTE
        _int8_results(result, int8_measured, note, keys)
    if opts.slide and get_task(cfg).slide_inference:
        result["slide_s_per_image"] = {
            name: _measure_slide(name, model, cfg, precision, kernels, opts, device, progress)
            for name, (precision, kernels) in (("fp32", modes["fp32"]),
                                               ("fast", modes["fast"]))}
        if opts.int8:
            result["slide_s_per_image"]["int8"] = None if int8_model is None else \
                _measure_slide("int8", int8_model, cfg, "int8", "reference", opts, device,
                               progress)
        result["slide_s_per_image"]["windows"] = slide_window_count(cfg)
    del model, inputs, int8_model
    _release(device)
    if opts.pipeline:
        progress("data pipeline")
        result["pipeline_images_per_s_per_worker"] = pipeline_speed(cfg, opts.pipeline_images)
        result["pipeline_data"] = get_task(cfg).bench_data
    result["speedup"] = {key: ratio(result[field]["fp32"], result[field]["fast"])
                         for key, field in keys}
    result["speedup_fp32_fast"] = {key: ratio(result[field]["fp32"], result[field]["fp32_fast"])
                                   for key, field in keys}
    result["peak_rss_gib"] = max_rss_bytes() / GIB
    return result
