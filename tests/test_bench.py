"""``denseclip bench`` and :mod:`denseclip.tools.bench`: tiny presets at 64×64, one timed call."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from denseclip import load_config
from denseclip.cli import main
from denseclip.runtime import resolve_precision
from denseclip.tools.bench import (
    default_size,
    make_inputs,
    time_calls,
)

QUICK = ["--size", "64", "64", "--batch", "1", "--repeats", "1", "--warmup", "0",
         "--pipeline-images", "2", "--no-int8"]
MODES = {"fp32", "fp32_fast", "fast"}
RSS_SLACK = 16 * 2**20  # ru_maxrss may trail /proc/self/statm by a few pages


def run_json(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, *QUICK, "--json"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # exactly one JSON line, no log or progress output
    return json.loads(lines[0])


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def ade20k_windows(preset: str) -> int:
    """Sliding windows over a 512×683 image rescaled to the preset's test scale (mmcv's
    keep-ratio rounding, mmseg's window grid), computed here from the definitions."""
    cfg = load_config(preset)
    long_edge, short_edge = max(cfg.data.test_scale), min(cfg.data.test_scale)
    factor = min(long_edge / 683, short_edge / 512)
    h, w = int(512 * factor + 0.5), int(683 * factor + 0.5)
    (crop_h, crop_w), (stride_h, stride_w) = cfg.evaluation.crop_size, cfg.evaluation.stride
    rows = math.ceil(max(h - crop_h, 0) / stride_h) + 1
    cols = math.ceil(max(w - crop_w, 0) / stride_w) + 1
    return rows * cols


def test_json_segmentation(capsys):
    r = run_json(capsys, "tiny_denseclip_res")
    assert r["preset"] == "tiny_denseclip_res"
    assert r["size"] == [64, 64] and r["batch"] == 1 and r["repeats"] == 1
    assert r["precision"] == resolve_precision("auto", "cpu")
    assert r["device"].startswith("cpu (")
    for key in ("eval_forward_s", "train_step_s", "peak_mem_gib"):
        assert set(r[key]) == MODES, key
        assert all(positive(v) for v in r[key].values()), r[key]
    for key, field in (("eval_forward", "eval_forward_s"), ("train_step", "train_step_s")):
        assert r["speedup"][key] == pytest.approx(r[field]["fp32"] / r[field]["fast"])
        assert r["speedup_fp32_fast"][key] == pytest.approx(
            r[field]["fp32"] / r[field]["fp32_fast"])
    slide = r["slide_s_per_image"]
    assert positive(slide["fp32"]) and positive(slide["fast"])
    assert slide["windows"] == ade20k_windows("tiny_denseclip_res") == 2
    assert positive(r["pipeline_images_per_s_per_worker"])
    # The kernel's high-water mark bounds every sampled RSS of this process (up to the
    # few pages its lazily synchronised counters may lag by).
    assert r["peak_rss_gib"] >= max(r["peak_mem_gib"].values()) - RSS_SLACK / 2**30
    assert "compiled" not in r["eval_forward_s"] and "compile_s" not in r


def test_table(capsys):
    assert main(["bench", "tiny_denseclip_vit", *QUICK]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny_denseclip_vit (segmentation): batch 1 x 64x64\n")
    for text in ("eval forward (s/batch)", "train step (s/batch)",
                 f"slide inference (s/image, {ade20k_windows('tiny_denseclip_vit')} windows)",
                 "peak memory (GiB)", "data pipeline (images/s, 1 worker)",
                 "fast vs fp32", "fp32_fast vs fp32", f"torch {torch.__version__}",
                 f"fast = {resolve_precision('auto', 'cpu')} + fast kernels", "process RSS"):
        assert text in out, text
    row = next(line for line in out.splitlines() if line.startswith("eval forward"))
    fp32, fp32_fast, fast, ratio, ratio_fast = row.split()[-5:]
    assert float(ratio.rstrip("x")) == pytest.approx(float(fp32) / float(fast), rel=0.02,
                                                     abs=0.01)
    assert float(ratio_fast.rstrip("x")) == pytest.approx(float(fp32) / float(fp32_fast),
                                                          rel=0.02, abs=0.01)


def test_fp32_precision_and_skipped_parts(capsys):
    r = run_json(capsys, "tiny_clip_res", "--precision", "fp32", "--no-train", "--no-slide",
                 "--no-pipeline")
    assert r["precision"] == "fp32"
    assert set(r["eval_forward_s"]) == MODES
    for key in ("train_step_s", "slide_s_per_image", "pipeline_images_per_s_per_worker"):
        assert key not in r
    assert set(r["speedup"]) == {"eval_forward"}


def test_compiled_mode(capsys):
    # The eager backend: dynamo's tracing without code generation, fast enough for a test.
    r = run_json(capsys, "tiny_denseclip_res", "compile_backend=eager", "--compile",
                 "--no-train", "--no-slide", "--no-pipeline")
    assert set(r["eval_forward_s"]) == MODES | {"compiled"}
    assert set(r["peak_mem_gib"]) == MODES | {"compiled"}
    assert set(r["compile_s"]) == {"eval_forward"} and positive(r["compile_s"]["eval_forward"])
    assert positive(r["eval_forward_s"]["compiled"])


@pytest.mark.parametrize("preset", ["tiny_retinanet_denseclip", "tiny_mask_rcnn_denseclip"])
def test_detection(capsys, preset):
    r = run_json(capsys, preset)
    assert r["task"] == load_config(preset).model.task
    assert "slide_s_per_image" not in r  # no sliding windows for detectors
    for key in ("eval_forward_s", "train_step_s"):
        assert set(r[key]) == MODES and all(positive(v) for v in r[key].values())
    assert positive(r["pipeline_images_per_s_per_worker"])  # the COCO pipeline


def test_overrides_after_options(capsys):
    r = run_json(capsys, "tiny_denseclip_res", "--no-train", "--no-pipeline",
                 "data.test_scale=[256,128]")
    # Twice the test scale: 128×171 at crop 64, stride 43 → 3 rows × 4 columns.
    assert r["slide_s_per_image"]["windows"] == 12


def test_bad_preset_exits_2(capsys):
    assert main(["bench", "no_such_preset", *QUICK]) == 2
    assert "no_such_preset" in capsys.readouterr().err


@pytest.mark.parametrize("size", [["16", "64"], ["64", "31"]])
def test_small_size_exits_2(capsys, size):
    assert main(["bench", "tiny_denseclip_res", "--size", *size, "--json"]) == 2
    captured = capsys.readouterr()
    assert "at least 32" in captured.err and not captured.out


def test_bad_counts_exit_2(capsys):
    assert main(["bench", "tiny_denseclip_res", "--repeats", "0"]) == 2
    assert "repeats" in capsys.readouterr().err


def test_default_sizes():
    assert default_size(load_config("denseclip_fpn_res50_512x512_80k")) == (512, 512)
    assert default_size(load_config("denseclip_fpn_vit-b_640x640_80k")) == (640, 640)
    assert default_size(load_config("retinanet_denseclip_r50_fpn_1x_coco")) == (800, 1333)
    assert default_size(load_config("tiny_mask_rcnn_denseclip")) == (128, 160)


RSS_PROBE = """
import torch
from denseclip.tools.bench import RSSSampler, current_rss_bytes, max_rss_bytes
before = current_rss_bytes()
with RSSSampler() as sampler:
    big = torch.ones(64 * 2**20)  # 256 MiB, written, so resident
    during = sampler.sample()
    assert big[-1] == 1
print(before, during, sampler.peak, max_rss_bytes())
"""


def test_rss_sampler_sees_a_live_allocation():
    # In a fresh process: a long-lived one may serve the allocation from memory that is
    # already resident (freed earlier but kept by the C allocator), moving no RSS.
    out = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True,
                         check=True, timeout=120)
    before, during, peak, max_rss = map(int, out.stdout.split()[-4:])
    nbytes = 256 * 2**20
    assert during >= before + 0.9 * nbytes
    assert peak >= during >= before
    assert max_rss >= peak - RSS_SLACK


def test_time_calls_counts_calls():
    calls = []
    result = time_calls(lambda: calls.append(1), warmup=2, repeats=3,
                        device=torch.device("cpu"), first_separately=True)
    assert len(calls) == 1 + 2 + 3
    assert len(result["times"]) == 3 and result["first"] >= 0
    assert result["median"] == sorted(result["times"])[1]


def test_detection_inputs_are_valid():
    cfg = load_config("tiny_mask_rcnn_denseclip")
    images, targets = make_inputs(cfg, 5, (64, 96), 2, torch.device("cpu"))
    assert [tuple(i.shape) for i in images] == [(3, 64, 96)] * 2
    assert all(0 <= float(i.min()) and float(i.max()) <= 1 for i in images)
    for t in targets:
        boxes = t["boxes"]
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
        assert bool((boxes[:, 2] <= 96).all()) and bool((boxes[:, 3] <= 64).all())
        assert t["labels"].max() < 5 and t["masks"].shape == (len(boxes), 64, 96)
        assert bool((t["masks"].flatten(1).sum(1) > 0).all())
