"""Training speed, peak memory and data-pipeline throughput.

    python benchmarks/train_speed.py [--device cuda] [--iters 5] [--skip-full]

Prints, each measured in this run:
* training iterations/s and peak memory of full training steps (forward, backward, AdamW
  step) for the tiny preset and for RN50-DenseCLIP at batch 2 (512×512 crops);
* images/s of the ADE20K training pipeline (decode, resize, crop, flip, photometric
  distortion, normalise) in one worker, on ADE20K-sized JPEGs (683×512 and 512×683);
* the ratio of one worker's throughput to what training consumes, i.e. how many workers
  keep the model fed.

Each model runs in its own subprocess so its peak memory (max RSS on CPU, max allocated
on GPU) is its own. For fp32 against the fast mode side by side, with eval forward, slide
inference and memory per mode, see ``denseclip bench PRESET`` (:mod:`denseclip.tools.bench`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def train_steps(preset: str, batch: int, iters: int, device: str) -> dict:
    import denseclip
    from denseclip.engine.optim import build_optimizer
    from denseclip.runtime import prepare_model, run_mode
    from denseclip.tools.bench import make_inputs

    cfg = denseclip.load_config(preset)
    torch.manual_seed(0)
    model = prepare_model(denseclip.build_model(cfg).to(device), cfg.kernels).train()
    optimizer = build_optimizer(model, cfg.optim, fused=cfg.kernels == "fast")  # as trained
    h, w = cfg.data.crop_size
    images, targets = make_inputs(cfg, model.num_classes, (h, w), batch, torch.device(device))
    precision = "fp32" if cfg.amp == "none" else cfg.amp

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with run_mode(precision, cfg.kernels, device):  # as the trainer runs a step
            losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()

    step()  # warm-up: allocator, kernels, lazy init
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB
    elapsed = time.perf_counter() - start
    return {"preset": preset, "batch": batch, "crop": [h, w], "iters": iters,
            "iters_per_s": iters / elapsed, "images_per_s": iters * batch / elapsed,
            "peak_mem_mib": peak, "device": device}


def pipeline_speed(num_images: int) -> dict:
    """The ADE20K training pipeline in one worker (:func:`denseclip.tools.bench.pipeline_speed`)."""
    import denseclip
    from denseclip.tools.bench import pipeline_speed as measure

    rate = measure(denseclip.load_config("denseclip_fpn_res50_512x512_80k"), num_images)
    return {"images": num_images, "images_per_s_per_worker": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-full", action="store_true", help="tiny preset only")
    parser.add_argument("--pipeline-images", type=int, default=40)
    parser.add_argument("--child", nargs=3, metavar=("PRESET", "BATCH", "ITERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        preset, batch, iters = args.child
        print(json.dumps(train_steps(preset, int(batch), int(iters), args.device)))
        return

    runs = [("tiny_denseclip_res", 2, max(args.iters, 20))]
    if not args.skip_full:
        runs.append(("denseclip_fpn_res50_512x512_80k", 2, args.iters))
    results = []
    for preset, batch, iters in runs:
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child",
                              preset, str(batch), str(iters)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    threads = torch.get_num_threads()
    pipe = pipeline_speed(args.pipeline_images)

    print(f"device: {args.device}, torch {torch.__version__}, {threads} CPU threads")
    print(f"{'preset':34s} {'batch':>5s} {'crop':>9s} {'it/s':>8s} {'img/s':>8s} "
          f"{'peak MiB':>9s}")
    for r in results:
        crop = "x".join(map(str, r["crop"]))
        print(f"{r['preset']:34s} {r['batch']:5d} {crop:>9s} {r['iters_per_s']:8.3f} "
              f"{r['images_per_s']:8.2f} {r['peak_mem_mib']:9.0f}")
    rate = pipe["images_per_s_per_worker"]
    print(f"data pipeline (ADE20K-sized JPEGs, training transforms): {rate:.1f} images/s "
          f"per worker")
    for r in results:
        print(f"workers needed to feed {r['preset']}: {r['images_per_s'] / rate:.2f}")


if __name__ == "__main__":
    main()
