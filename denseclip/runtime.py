"""How a model runs: numeric precision and fast or reference kernels.

Two independent choices, both in the config:

* ``precision`` (``fp32 | bf16 | fp16 | auto``): the autocast dtype of inference.
  ``auto`` is the fastest precision the hardware runs natively: bf16 on CUDA GPUs that
  support it and on CPUs with bf16 instructions (AVX-512 BF16 or AMX on x86, the BF16
  extension on Arm), fp16 on older CUDA GPUs, fp32 otherwise. Under autocast the
  convolutions and matrix products run in the low precision; norms, softmax, the losses
  and the pixel-text cosine stay in fp32. Training keeps its own ``amp`` setting.
  ``int8`` (segmentation on CPUs, opt-in: ``auto`` never picks it, as it changes results
  by more than rounding) runs a statically quantised copy of the model in ONNX Runtime
  (:mod:`denseclip.inference.int8`); whatever PyTorch computes around it stays fp32.
* ``kernels`` (``fast | reference``): ``fast`` runs the convolutional paths in
  ``channels_last`` memory format, attention through ``F.scaled_dot_product_attention``,
  BatchNorm folded into the preceding convolution at inference, and the text encoder's
  positions shared by every class (start token and learnable contexts) once per context
  instead of once per class. These change results only by floating-point rounding.
  ``reference`` computes exactly as written in the paper's code: explicit attention
  matrices, NCHW, separate BatchNorm, every class sequence in full. FLOP counting and ONNX
  export always use the reference kernels.

The kernel choice is a context (:func:`reference_kernels`) rather than a model attribute,
so one model object serves both: :mod:`denseclip.tools.flops` and :mod:`denseclip.tools.export` wrap
their traces in it.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16", "auto", "int8")
KERNELS = ("fast", "reference")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_REFERENCE = ContextVar("denseclip_reference_kernels", default=False)


def fast_kernels() -> bool:
    """Whether model code may use the fast kernels here (not inside :func:`reference_kernels`)."""
    return not _REFERENCE.get()


@contextlib.contextmanager
def reference_kernels(enabled: bool = True) -> Iterator[None]:
    """Within this context, models compute with the reference kernels (``enabled=False``
    leaves the current choice as it is)."""
    token = _REFERENCE.set(True) if enabled else None
    try:
        yield
    finally:
        if token is not None:
            _REFERENCE.reset(token)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bf16 arithmetic in hardware (x86: AVX-512 BF16 or AMX-BF16;
    Arm: the BF16 extension). Without it bf16 is emulated and slower than fp32."""
    machine = platform.machine().lower()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags: set[str] = set()
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags.update(value.split())
        if machine in ("x86_64", "amd64", "i686"):
            return bool(flags & {"avx512_bf16", "amx_bf16"})
        return "bf16" in flags
    if platform.system() == "Darwin" and machine == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return out.strip() == "1"
    return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The concrete precision (``fp32``, ``bf16``, ``fp16`` or ``int8``) that ``precision``
    means on ``device``; ``auto`` picks the fastest native floating-point one (never
    int8). Raises ``ValueError`` for an unknown name or a precision the device cannot
    run (int8: CPUs only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"precision=int8 runs on CPUs (ONNX Runtime); on {device} use "
                             f"fp16, bf16 or fp32")
        return precision
    if device.type == "cuda":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False)
        if precision == "auto":
            return "bf16" if bf16 else "fp16"
        if precision == "bf16" and not bf16:
            raise ValueError(f"{device} has no native bf16 support; use precision=fp16 or fp32")
        return precision
    if precision == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision != "fp32" and device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"precision={precision} needs autocast, which {device.type} lacks")
    return precision


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (already resolved, or ``auto``) on ``device``; a no-op
    context for fp32 and int8 (whose quantised model runs outside PyTorch)."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved in ("fp32", "int8"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[resolved])


@contextlib.contextmanager
def run_mode(precision: str, kernels: str, device: str | torch.device) -> Iterator[str]:
    """Autocast to ``precision`` with the ``kernels`` choice in effect; yields the resolved
    precision."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be 'fast' or 'reference', got {kernels!r}")
    resolved = resolve_precision(precision, device)
    with reference_kernels(kernels == "reference"), autocast(resolved, device):
        yield resolved


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where autocast is off on ``device`` (for computations that stay in fp32)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast (e.g. meta)
        return contextlib.nullcontext()


def prepare_model(model: nn.Module, kernels: str) -> nn.Module:
    """Put ``model``'s convolution weights in the memory format of ``kernels`` (in place):
    ``channels_last`` for the fast kernels, contiguous NCHW for the reference."""
    fmt = torch.channels_last if kernels == "fast" else torch.contiguous_format
    return model.to(memory_format=fmt)
