"""How a model runs (:mod:`denseclip.runtime`): precision resolution, autocast, the kernel
switch, memory formats and the CPU's bf16 detection. Only what a CPU can check."""

from __future__ import annotations

import platform
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import denseclip
from denseclip.config import ConfigError
from denseclip.runtime import (
    DTYPES,
    KERNELS,
    PRECISIONS,
    autocast,
    cpu_has_native_bf16,
    fast_kernels,
    fp32_region,
    prepare_model,
    reference_kernels,
    resolve_precision,
    run_mode,
)


def _matmul_dtype() -> torch.dtype:
    a = torch.randn(4, 8)
    return (a @ torch.randn(8, 3)).dtype


# ------------------------------------------------------------------ precision
def test_auto_on_cpu_is_bf16_exactly_when_the_cpu_runs_bf16_natively():
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_explicit_precisions_are_kept_on_cpu(precision):
    assert resolve_precision(precision, "cpu") == precision


def test_fp32_and_auto_resolve_on_a_device_without_autocast():
    assert resolve_precision("fp32", "meta") == "fp32"
    assert resolve_precision("auto", "meta") == "fp32"  # only CPUs and GPUs pick bf16


@pytest.mark.parametrize("name", ["fp64", "float32", "BF16", "", "half"])
def test_an_unknown_precision_is_a_value_error_naming_it(name):
    with pytest.raises(ValueError) as exc:
        resolve_precision(name, "cpu")
    assert repr(name) in str(exc.value)
    assert all(p in str(exc.value) for p in PRECISIONS)  # and the valid ones


def test_autocast_fp32_is_a_no_op():
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert _matmul_dtype() == torch.float32


def test_autocast_bf16_runs_matrix_products_in_bf16():
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert _matmul_dtype() == torch.bfloat16
    assert _matmul_dtype() == torch.float32  # and only inside


def test_autocast_auto_follows_the_resolved_precision():
    expected = {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_precision("auto", "cpu")]
    with autocast("auto", "cpu"):
        assert _matmul_dtype() == expected


def test_fp32_region_turns_autocast_off_inside_it():
    with autocast("bf16", "cpu"):
        with fp32_region(torch.device("cpu")):
            assert _matmul_dtype() == torch.float32
        assert _matmul_dtype() == torch.bfloat16


# ------------------------------------------------------------------ kernels
def test_fast_kernels_by_default():
    assert fast_kernels() is True


def test_reference_kernels_nest_and_reset():
    assert fast_kernels()
    with reference_kernels():
        assert not fast_kernels()
        with reference_kernels():
            assert not fast_kernels()
        assert not fast_kernels()  # the inner exit does not switch the outer context off
        with reference_kernels(enabled=False):
            assert not fast_kernels()  # enabled=False leaves the current choice
        assert not fast_kernels()
    assert fast_kernels()
    with reference_kernels(enabled=False):
        assert fast_kernels()
    assert fast_kernels()


def test_reference_kernels_reset_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with reference_kernels():
            raise RuntimeError("boom")
    assert fast_kernels()


def test_the_kernel_choice_is_per_thread_context():
    """A ContextVar: another thread keeps its own (default) choice."""
    seen = []
    with reference_kernels():
        t = threading.Thread(target=lambda: seen.append(fast_kernels()))
        t.start()
        t.join()
        assert not fast_kernels()
    assert seen == [True]


def test_run_mode_sets_both_choices_and_yields_the_resolved_precision():
    with run_mode("fp32", "reference", "cpu") as resolved:
        assert resolved == "fp32"
        assert not fast_kernels()
        assert _matmul_dtype() == torch.float32
    assert fast_kernels()
    with run_mode("bf16", "fast", "cpu") as resolved:
        assert resolved == "bf16"
        assert fast_kernels()
        assert _matmul_dtype() == torch.bfloat16
    with run_mode("auto", "fast", "cpu") as resolved:
        assert resolved == resolve_precision("auto", "cpu")


@pytest.mark.parametrize("kernels", ["slow", "Fast", "", None])
def test_run_mode_rejects_unknown_kernels(kernels):
    with pytest.raises(ValueError) as exc:
        with run_mode("fp32", kernels, "cpu"):
            pass
    assert repr(kernels) in str(exc.value)
    assert fast_kernels()


def test_run_mode_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="fp64"):
        with run_mode("fp64", "fast", "cpu"):
            pass


def test_prepare_model_switches_conv_weights_to_channels_last_and_back():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    conv = model[0].weight
    assert conv.is_contiguous()
    assert prepare_model(model, "fast") is model  # in place
    for m in (model[0], model[2]):
        assert m.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()  # really another layout (3x3 kernels)
    prepare_model(model, "reference")
    for m in (model[0], model[2]):
        assert m.weight.is_contiguous()
    torch.testing.assert_close(model[0].weight, conv, rtol=0, atol=0)  # same values


def test_config_keys_default_to_auto_and_fast_and_are_checked():
    cfg = denseclip.load_config("tiny_denseclip_res")
    assert cfg.precision == "auto" and cfg.kernels == "fast"
    assert set(KERNELS) == {"fast", "reference"}
    cfg = denseclip.load_config("tiny_denseclip_res", ["precision=bf16", "kernels=reference"])
    assert cfg.precision == "bf16" and cfg.kernels == "reference"
    with pytest.raises(ConfigError, match="fp64"):
        denseclip.load_config("tiny_denseclip_res", ["precision=fp64"])
    with pytest.raises(ConfigError, match="slow"):
        denseclip.load_config("tiny_denseclip_res", ["kernels=slow"])


# ------------------------------------------------------------------ CPU detection
def _cpuinfo_flags() -> set[str] | None:
    """Every flag of /proc/cpuinfo's ``flags`` (x86) or ``Features`` (Arm) lines, parsed
    independently of the package; None without /proc/cpuinfo."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return None
    flags: set[str] = set()
    for line in path.read_text(errors="replace").splitlines():
        if ":" not in line:
            continue
        key, value = line.split(":", 1)
        if key.strip().lower() in {"flags", "features"}:
            flags |= set(value.split())
    return flags


def test_cpu_bf16_detection_agrees_with_proc_cpuinfo():
    detected = cpu_has_native_bf16()
    assert isinstance(detected, bool)
    flags = _cpuinfo_flags()
    machine = platform.machine().lower()
    if flags is None:  # no /proc (macOS, Windows): nothing independent to compare with
        return
    if machine in ("x86_64", "amd64"):
        assert detected == bool({"avx512_bf16", "amx_bf16"} & flags)
    elif machine in ("aarch64", "arm64"):
        assert detected == ("bf16" in flags)


# Both answers of the detection, whatever CPU runs the suite: the tests above only see this
# machine's answer (bf16 on AVX-512 BF16 or AMX, fp32 on AVX2-only CPUs).
CPUINFO = {
    "avx2 only": ("x86_64", "fpu sse4_2 avx avx2 fma", False),
    "AVX-512 without BF16": ("x86_64", "avx2 avx512f avx512bw avx512_vnni", False),
    "AVX-512 BF16 (Zen 4, Cooper Lake)": ("x86_64", "avx2 avx512f avx512_bf16", True),
    "AMX (Sapphire Rapids)": ("x86_64", "avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", True),
    "AMX-BF16 alone": ("x86_64", "avx2 amx_bf16 amx_tile", True),
    "Arm with BF16": ("aarch64", "fp asimd sve bf16 i8mm", True),
    "Arm without": ("aarch64", "fp asimd crc32", False),
}


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """Point the detection at a written /proc/cpuinfo of another machine (its cache is
    cleared before and after, so the rest of the suite sees the real CPU again)."""
    import denseclip.runtime as runtime

    def use(machine: str, flags: str) -> None:
        path = tmp_path / "cpuinfo"
        key = "flags" if machine == "x86_64" else "Features"
        path.write_text(f"processor\t: 0\n{key}\t\t: {flags}\n\nprocessor\t: 1\n"
                        f"{key}\t\t: {flags}\n")
        monkeypatch.setattr(runtime.platform, "machine", lambda: machine)
        monkeypatch.setattr(runtime, "Path", lambda _: path)
        runtime.cpu_has_native_bf16.cache_clear()

    yield use
    runtime.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("cpu", list(CPUINFO))
def test_auto_resolves_from_the_cpu_flags_of_other_machines(fake_cpu, cpu):
    machine, flags, native = CPUINFO[cpu]
    fake_cpu(machine, flags)
    assert cpu_has_native_bf16() is native
    expected = "bf16" if native else "fp32"
    assert resolve_precision("auto", "cpu") == expected
    with run_mode("auto", "fast", "cpu") as resolved:
        assert resolved == expected
        assert _matmul_dtype() == DTYPES[expected]
