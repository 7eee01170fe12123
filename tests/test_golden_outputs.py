"""Tiny-model outputs stay what they were when pinned (see ``tests/helpers/golden.py``).

On the machine model the fixture was recorded on (same torch and OpenCV builds, same CPU
model and kernel-selecting features: :func:`golden.platform_key`) every tensor must be
bit-identical, so re-pinning there catches any unintended change; elsewhere floating-point
kernels round differently and :func:`golden.compare` checks a tight tolerance instead. The
test says which comparison it used."""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import golden

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def pinned():
    return torch.load(golden.FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def current():
    return golden.compute()


def test_every_pinned_output_is_reproduced(pinned, current, capsys, record_property):
    how = golden.compare(pinned, current)
    record_property("golden_comparison", how)
    with capsys.disabled():
        print(f"\ngolden outputs: {how} comparison (recorded on {pinned['platform']!r}; "
              f"this machine {golden.platform_key()!r})")


def test_the_recording_key_takes_the_bit_exact_path(pinned):
    """With the recording key, outputs equal to the fixture pass bit-exactly, and a change in
    the last bit of one value is caught, although it is well within the tolerance."""
    same = copy.deepcopy(pinned["outputs"])
    assert golden.compare(pinned, same, key=pinned["platform"]) == "bit-identical"
    changed = _one_ulp_changed(same, "tiny_denseclip_res", "logits")
    with pytest.raises(AssertionError, match="tiny_denseclip_res.logits changed"):
        golden.compare(pinned, changed, key=pinned["platform"])
    assert golden.compare(pinned, changed, key="another machine") == "tolerance"


def test_a_foreign_key_takes_the_tolerance_path(pinned, current):
    """The situation of an Intel CPU with AMX against a fixture recorded on an AMD EPYC: both
    report AVX512, yet the keys differ, so the tolerance path is taken; it passes with this
    machine's outputs and still fails on a change beyond the tolerance."""
    amd = _cpuinfo("AuthenticAMD", "25", "17", "AMD EPYC 9654 96-Core Processor",
                   "avx2 fma avx512f avx512_bf16 avx512_vnni")
    intel = _cpuinfo("GenuineIntel", "6", "143", "Intel(R) Xeon(R) Platinum 8480+",
                     "avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8")
    assert golden.platform_key(amd) != golden.platform_key(intel)
    assert "amx_bf16" in golden.platform_key(intel)
    recorded = dict(pinned, platform=golden.platform_key(amd))
    assert golden.compare(recorded, current, key=golden.platform_key(intel)) == "tolerance"
    broken = copy.deepcopy(current)
    broken["tiny_clip_res"]["logits"]["sample"][7] += 1e-3
    with pytest.raises(AssertionError, match="tiny_clip_res.logits"):
        golden.compare(recorded, broken, key=golden.platform_key(intel))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 kernels only")
def test_other_cpu_kernels_agree_within_the_tolerance(pinned):
    """A real foreign platform: a fresh process restricted to AVX2 kernels (ATen and oneDNN)
    rounds differently from the AVX-512 kernels, gets another key and passes the tolerance
    comparison."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
               PYTHONPATH=str(ROOT))
    code = ("import torch\nfrom tests.helpers import golden\n"
            "pinned = torch.load(golden.FIXTURE, weights_only=True)\n"
            "print(golden.platform_key() != pinned['platform'], "
            "golden.compare(pinned, golden.compute()))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["True", "tolerance"]


def _cpuinfo(vendor: str, family: str, model: str, name: str, flags: str) -> str:
    return "\n".join(["processor\t: 0", f"vendor_id\t: {vendor}", f"cpu family\t: {family}",
                      f"model\t\t: {model}", f"model name\t: {name}", "stepping\t: 1",
                      f"flags\t\t: fpu sse sse2 {flags}", "", "processor\t: 1",
                      "vendor_id\t: other"])


def _one_ulp_changed(outputs: dict, model: str, key: str) -> dict:
    """``outputs`` with one value of ``model.key`` moved to the next float: its digest
    changes (as it would from any kernel change), its sample stays within the tolerance."""
    changed = copy.deepcopy(outputs)
    entry = changed[model][key]
    sample = entry["sample"]
    sample[0] = torch.nextafter(sample[0], torch.tensor(float("inf"), dtype=sample.dtype))
    entry["sha256"] = "0" * 64
    return changed
