"""Outputs of tiny models with fixed weights and inputs, pinned in
``tests/fixtures/golden_tiny.pt`` so that restructuring the code cannot change a number.

Only public API is used (``load_config``, ``build_model``, ``Predictor``, ``export``), so the
same function computes the outputs before and after code moves. Regenerate the fixture
deliberately, when a change is *meant* to alter outputs::

    .venv/bin/python -m tests.helpers.golden
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import numpy as np
import torch

import denseclip
from denseclip import Predictor
from denseclip.export import SegmentorForExport
from denseclip.runtime import reference_kernels

FIXTURE = Path(__file__).parents[1] / "fixtures" / "golden_tiny.pt"
SEGMENTATION = {
    "tiny_denseclip_res": [],
    "tiny_denseclip_vit": [],
    "tiny_clip_res": [],
    "tiny_denseclip_res_pre": ["model.guidance.prompting=pre"],
}
DETECTION = ["tiny_retinanet_denseclip", "tiny_retinanet_clip", "tiny_mask_rcnn_denseclip"]
OPEN_CLASSES = ["cat", "dog", "grass"]
SAMPLE = 4096  # values kept of a large tensor (besides its digest)


def platform_key() -> str:
    """Where bit-identical outputs can be expected: same torch build and CPU kernels."""
    return f"{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{platform.machine()}"


def _model(preset: str, overrides: list[str]):
    # The reference computation (fp32, NCHW, explicit attention): what was pinned.
    overrides = [*overrides, "kernels=reference", "precision=fp32"]
    cfg = denseclip.load_config(preset.removesuffix("_pre"), overrides)
    torch.manual_seed(0)
    return cfg, denseclip.build_model(cfg)


def _segmentation(name: str, overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg, model = _model(name, overrides)
    out: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 96, generator=gen)
    targets = torch.randint(0, model.num_classes, (2, 64, 96), generator=gen)
    targets[:, :8] = 255
    with torch.no_grad():
        out["logits"] = model.eval()(images)
    model.train()
    torch.manual_seed(2)  # dropout
    for key, value in model(images, targets).items():
        out[key] = value.detach()
    if model.guidance is not None and model.guidance.prompting == "post":
        model.eval()
        predictor = Predictor.from_model(model, cfg, classes=OPEN_CLASSES)
        image = (np.random.default_rng(3).random((70, 110, 3)) * 255).astype(np.uint8)
        result = predictor.predict(image)
        out["predict_probs"] = torch.from_numpy(result.probs)
        out["predict_labels"] = torch.from_numpy(result.labels)
        out["predict_open_scores"] = torch.from_numpy(result.open_scores)
        wrapper = SegmentorForExport(model, predictor.open_text_embeddings()).eval()
        with torch.no_grad():
            logits, scores = wrapper(images)
        out["export_logits"], out["export_open_scores"] = logits, scores
    return out


def _detection(name: str) -> dict[str, torch.Tensor]:
    _, model = _model(name, [])
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 100, 140, generator=gen), torch.rand(3, 120, 90, generator=gen)]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        detections = model.eval()(images)
    for i, det in enumerate(detections):
        for key, value in det.items():
            out[f"eval{i}_{key}"] = value
    targets = []
    for img in images:
        h, w = img.shape[-2:]
        boxes = torch.tensor([[5.0, 8.0, w * 0.6, h * 0.7], [w * 0.3, h * 0.2, w - 4.0, h - 6.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 8 : int(h * 0.7), 5 : int(w * 0.6)] = 1
        masks[1, int(h * 0.2) : h - 6, int(w * 0.3) : w - 4] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 4]), "masks": masks})
    model.train()
    torch.manual_seed(2)  # proposal and RoI sampling
    for key, value in model(images, targets).items():
        out[key] = value.detach()
    return out


def fingerprint(t: torch.Tensor) -> dict:
    """What the fixture keeps of a tensor: dtype, shape, the SHA-256 of its bytes (for
    bit-identity) and up to :data:`SAMPLE` evenly spaced values (for tolerance checks)."""
    t = t.detach().contiguous().cpu()
    flat = t.reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    return {"dtype": str(t.dtype), "shape": list(t.shape),
            "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
            "sample": flat[::step].clone()}


def compute() -> dict[str, dict[str, dict]]:
    """The fingerprint of every pinned output, keyed by model then output name."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with reference_kernels():
            result = {name: _segmentation(name, ov) for name, ov in SEGMENTATION.items()}
            result.update({name: _detection(name) for name in DETECTION})
    finally:
        torch.set_num_threads(threads)
    return {model: {k: fingerprint(v) for k, v in outs.items()} for model, outs in result.items()}


if __name__ == "__main__":
    torch.save({"platform": platform_key(), "outputs": compute()}, FIXTURE)
    print(f"wrote {FIXTURE}")
