"""DenseCLIP on a CUDA GPU (A100/H100 class): images/s of training and inference for the
RN50, RN101 and ViT-B DenseCLIP presets, and how much of the GPU's bf16 dense peak the
backbone reaches.

    python benchmarks/gpu_bench.py [--batch 8] [--presets P ...] [--repeats 10] [--warmup 3]
                                   [--precision bf16] [--no-compile] [--peak-tflops X]

Per preset, :func:`denseclip.tools.bench.run_benchmark` measures, in one process, an eval forward
and a full training step (AdamW) at the preset's crop size in fp32 (reference kernels),
fp32 with the fast kernels, the fast mode (``--precision``, bf16 by default, with the fast
kernels) and, unless ``--no-compile``, the fast mode under ``torch.compile`` (compile time
reported apart), plus the sliding-window test of one ADE20K-sized image. Images/s is the
batch over the median time of one call.

Backbone utilisation: the backbone's multiply-adds for one image are counted with
:func:`denseclip.tools.flops.complexity` (one multiply-add = 2 FLOPs), a backbone-only forward
(``model.backbone(images)``, no grad, the fast precision and kernels, compiled unless
``--no-compile``) is timed, and FLOP/s is divided by the GPU's dense bf16 peak from
:data:`PEAK_BF16_TFLOPS` (matched on the device name; ``--peak-tflops`` overrides it or
supplies it for other GPUs). Needs CUDA: without it the script says so and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch

from denseclip import build_model, load_config
from denseclip.runtime import prepare_model, run_mode
from denseclip.tools.bench import BenchOptions, run_benchmark, time_calls
from denseclip.tools.flops import complexity

PRESETS = ("denseclip_fpn_res50_512x512_80k", "denseclip_fpn_res101_512x512_80k",
           "denseclip_fpn_vit-b_640x640_80k")

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, keyed
#: by the words of ``torch.cuda.get_device_name()`` that identify the part; the first
#: entry whose words all occur in the name wins (so the PCIe/NVL H100s come before SXM).
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (("GH200",), 989.0),
    (("H200",), 989.0),
    (("A100",), 312.0),
    (("A30",), 165.0),
    (("A10",), 125.0),
    (("L40S",), 362.0),
    (("L40",), 181.0),
    (("L4",), 121.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU named ``device_name``, or None if not in the table."""
    words = set(re.findall(r"[A-Za-z0-9]+", device_name))
    for keys, tflops in PEAK_BF16_TFLOPS:
        if set(keys) <= words:
            return tflops
    return None


def backbone_tflops(preset: str, batch: int, precision: str, compile: bool, repeats: int,
                    warmup: int) -> dict:
    """Backbone FLOPs per image and the TFLOP/s of a backbone-only forward."""
    cfg = load_config(preset)
    h, w = cfg.data.crop_size
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    macs = complexity(model, (h, w))["gmacs"]["by_module"]["backbone"] * 1e9  # per image
    backbone = prepare_model(model, "fast").eval().backbone
    net = torch.compile(backbone) if compile else backbone
    images = torch.randn(batch, 3, h, w, device="cuda")

    def forward() -> None:
        with torch.no_grad(), run_mode(precision, "fast", "cuda"):
            net(images)

    timing = time_calls(forward, warmup, repeats, torch.device("cuda"), first_separately=compile)
    flops = 2 * macs * batch
    return {"gflops_per_image": 2 * macs / 1e9, "seconds": timing["median"],
            "tflops": flops / timing["median"] / 1e12}


def markdown(rows: list[dict], modes: list[str], peak: float | None) -> str:
    heads = (["preset", "batch", "size"] + [f"train img/s {m}" for m in modes]
             + [f"infer img/s {m}" for m in modes]
             + ["slide s/img fast", "backbone TFLOP/s", "% of bf16 peak"])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        r, bb = row["result"], row["backbone"]
        b = r["batch"]
        cells = [r["preset"], str(b), "x".join(map(str, r["size"]))]
        cells += [f"{b / r['train_step_s'][m]:.1f}" if "train_step_s" in r else "-"
                  for m in modes]
        cells += [f"{b / r['eval_forward_s'][m]:.1f}" for m in modes]
        slide = r.get("slide_s_per_image")
        cells.append(f"{slide['fast']:.3f}" if slide else "-")
        cells.append(f"{bb['tflops']:.1f}")
        cells.append(f"{100 * bb['tflops'] / peak:.1f}" if peak else "?")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16"),
                        help="the fast mode's precision (default bf16)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile mode")
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--no-slide", dest="slide", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak in TFLOP/s (default: from the table "
                             "of known GPUs)")
    parser.add_argument("--json", metavar="FILE", help="also write every result to FILE")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench.py needs a CUDA GPU, but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); on a CPU run "
              "`denseclip bench PRESET` instead", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for preset in args.presets:
        print(f"{preset}: measuring ...", file=sys.stderr, flush=True)
        opts = BenchOptions(batch=args.batch, device="cuda", precision=args.precision,
                            repeats=args.repeats, warmup=args.warmup, compile=args.compile,
                            train=args.train, slide=args.slide, pipeline=False)
        result = run_benchmark(load_config(preset), opts)
        backbone = backbone_tflops(preset, args.batch, result["precision"], args.compile,
                                   args.repeats, args.warmup)
        rows.append({"result": result, "backbone": backbone})
        torch.cuda.empty_cache()  # the backbone's model is gone with its function
    modes = list(rows[0]["result"]["eval_forward_s"]) if rows else []
    print(f"device: {name}, torch {torch.__version__}, fast mode: {args.precision} + fast "
          f"kernels{' (+ torch.compile)' if args.compile else ''}; bf16 dense peak: "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    print()
    print(markdown(rows, modes, peak))
    print()
    for row in rows:
        r = row["result"]
        extra = ""
        if "compile_s" in r:
            extra = ", compile " + ", ".join(f"{k} {v:.0f} s" for k, v in r["compile_s"].items())
        print(f"{r['preset']}: peak memory (GiB) "
              + ", ".join(f"{m} {v:.1f}" for m, v in r["peak_mem_gib"].items())
              + f"; backbone {row['backbone']['gflops_per_image']:.1f} GFLOP/image" + extra)
    print("fp32 = fp32 + reference kernels (TF32 off); images/s = batch / median call time; "
          "backbone TFLOP/s = 2 x backbone multiply-adds / backbone-only forward time")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": name, "peak_tflops": peak, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
