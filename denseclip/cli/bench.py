"""``denseclip bench``: speed and memory of a preset in fp32 and in the fast mode, side by
side in one run (:mod:`denseclip.tools.bench`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tqdm import tqdm

from ..tools.bench import BenchOptions, check_options, measurement_labels, ratio, run_benchmark
from .common import load_cli_config


def run(args: argparse.Namespace) -> int:
    cfg = load_cli_config(args)
    opts = BenchOptions(size=args.size, batch=args.batch, device=args.device,
                        precision=args.precision, repeats=args.repeats, warmup=args.warmup,
                        compile=args.compile, train=args.train, slide=args.slide,
                        pipeline=args.pipeline, pipeline_images=args.pipeline_images,
                        int8=args.int8)
    check_options(cfg, opts)  # bad sizes, counts or devices fail before the progress bar
    labels = measurement_labels(cfg, opts)
    with tqdm(total=len(labels), desc="bench", unit="step", disable=args.json,
              dynamic_ncols=True, leave=False) as bar:
        started = [False]

        def progress(label: str) -> None:
            if started[0]:
                bar.update()
            started[0] = True
            bar.set_description(label)

        result = run_benchmark(cfg, opts, progress)
        bar.update()
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def format_table(result: dict[str, Any]) -> str:
    """A human-readable table of a :func:`run_benchmark` result: one row per measurement,
    one column per mode, and the speed-ups fp32 / fast, fp32 / fp32_fast (and fp32 / int8
    with the int8 mode)."""
    modes = list(result["eval_forward_s"])
    rows: list[tuple[str, dict[str, float], str]] = [
        ("eval forward (s/batch)", result["eval_forward_s"], ".4f")]
    if "train_step_s" in result:
        rows.append(("train step (s/batch)", result["train_step_s"], ".4f"))
    if "slide_s_per_image" in result:
        slide = result["slide_s_per_image"]
        rows.append((f"slide inference (s/image, {slide['windows']} windows)",
                     {m: slide[m] for m in ("fp32", "fast", "int8") if m in slide}, ".4f"))
    rows.append(("peak memory (GiB)", result["peak_mem_gib"], ".2f"))
    if result.get("int8_prepare_s") is not None:
        rows.append(("int8: quantisation (s)", {"int8": result["int8_prepare_s"]}, ".2f"))
    if "compile_s" in result:
        for key, value in result["compile_s"].items():
            rows.append((f"compile: first {key.replace('_', ' ')} (s)", {"compiled": value},
                         ".2f"))
    if "pipeline_images_per_s_per_worker" in result:
        rows.append(("data pipeline (images/s, 1 worker)",
                     {modes[0]: result["pipeline_images_per_s_per_worker"]}, ".1f"))
    label_width = max(len(label) for label, _, _ in rows) + 2
    compared = ["fast", "fp32_fast"] + (["int8"] if "int8" in modes else [])
    heads = [*modes, *(f"{m} vs fp32" for m in compared)]
    widths = [max(10, len(h) + 2) for h in heads]
    lines = [
        f"{result['preset']} ({result['task']}): batch {result['batch']} x "
        f"{result['size'][0]}x{result['size'][1]}",
        f"device: {result['device']}, torch {result['torch']}",
        f"modes: fp32 = fp32 + reference kernels (NCHW); fp32_fast = fp32 + fast kernels "
        f"(channels_last); fast = {result['precision']} + fast kernels"
        + ("; compiled = fast + torch.compile" if "compiled" in modes else "")
        + ("; int8 = ONNX Runtime, statically quantised" if "int8" in modes else ""),
        "",
        f"{'measurement':<{label_width}}" + "".join(f"{h:>{w}}" for h, w in
                                                    zip(heads, widths, strict=True)),
        "-" * (label_width + sum(widths)),
    ]
    for label, values, fmt in rows:
        cells = [_cell(values.get(m), fmt) for m in modes]
        ratios = [f"{ratio(values['fp32'], values[m]):.2f}x"
                  if label != "peak memory (GiB)" and values.get("fp32") is not None
                  and values.get(m) is not None else "" for m in compared]
        lines.append(f"{label:<{label_width}}" + "".join(
            f"{c:>{w}}" for c, w in zip([*cells, *ratios], widths, strict=True)))
    lines.append("-" * (label_width + sum(widths)))
    lines.append(f"times: median of {result['repeats']} timed call(s) after "
                 f"{result['warmup']} warm-up call(s) (time.perf_counter)")
    lines.append(f"peak memory: {result['peak_mem_method']}; process max RSS (ru_maxrss) "
                 f"{result['peak_rss_gib']:.2f} GiB")
    if "int8_note" in result:
        lines.append(f"int8: {result['int8_note']}")
    if "pipeline_images_per_s_per_worker" in result:
        lines.append(f"data pipeline: the training transforms on generated "
                     f"{result['pipeline_data']} JPEGs, "
                     "one intra-op thread, no model")
    return "\n".join(lines)
