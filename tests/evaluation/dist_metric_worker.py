"""Worker launched by ``torch.distributed.run`` in test_metrics.py (not a test module itself).

Each rank accumulates its share of a fixed set of random segmentation maps, reduces the
confusion matrix over the gloo group and writes ``{local, reduced, full}`` to
``<out_dir>/rank<r>.json``, where ``full`` is the matrix of all maps on one process.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from denseclip.evaluation.metrics import SegmentationMetric

NUM_CLASSES = 7
IGNORE = 255


def make_samples() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    samples = []
    for i in range(6):
        h, w = 9 + i, 13 - i
        pred = torch.randint(0, NUM_CLASSES, (h, w), generator=gen)
        target = torch.randint(0, NUM_CLASSES, (h, w), generator=gen)
        target[torch.rand((h, w), generator=gen) < 0.2] = IGNORE
        samples.append((pred, target))
    return samples


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    samples = make_samples()

    metric = SegmentationMetric(NUM_CLASSES, IGNORE)
    for pred, target in samples[rank::world]:
        metric.update(pred, target)
    local = metric.confusion.clone()
    metric.all_reduce()

    full = SegmentationMetric(NUM_CLASSES, IGNORE)
    for pred, target in samples:
        full.update(pred, target)

    result = {
        "world": world,
        "local": local.tolist(),
        "reduced": metric.confusion.tolist(),
        "full": full.confusion.tolist(),
        "dtype": str(metric.confusion.dtype),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
