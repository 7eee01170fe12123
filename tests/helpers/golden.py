"""Outputs of tiny models with fixed weights and inputs, pinned in
``tests/fixtures/golden_tiny.pt`` so that restructuring the code cannot change a number.

Bit-identity is promised only on the machine model the fixture was recorded on (see
:func:`platform_key`); elsewhere :func:`compare` checks a tight tolerance.

Only public API is used (``load_config``, ``build_model``, ``Predictor``, ``export``), so the
same function computes the outputs before and after code moves. Regenerate the fixture
deliberately, when a change is *meant* to alter outputs::

    .venv/bin/python -m tests.helpers.golden
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import numpy as np
import torch

import denseclip
from denseclip import Predictor
from denseclip.runtime import reference_kernels
from denseclip.tools.export import SegmentorForExport

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


# CPU features that select different float kernels (oneDNN, MKL, ATen, OpenCV) although
# ATen reports the same vector level: bf16/int8 dot products and AMX tiles.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU as kernels see it: vendor, family/model/stepping, model name and
    :data:`KERNEL_FLAGS` present, from ``/proc/cpuinfo`` (or ``cpuinfo``'s text; elsewhere
    :func:`platform.processor`)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or "unknown CPU"
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():  # the first processor
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    model = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return " ".join([fields.get("vendor_id", "?"), model, fields.get("model name", "?"),
                     "+".join(f for f in KERNEL_FLAGS if f in flags) or "-"])


# Environment variables that make the same machine run other kernels (oneDNN's and MKL's
# instruction-set caps, ATen's dispatch level, MKL's reproducibility mode).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
              "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def platform_key(cpuinfo: str | None = None) -> str:
    """Where bit-identical outputs are promised: the same torch build (its oneDNN and MKL),
    OpenCV build, kernel level, CPU model with the features that pick kernels, and any
    environment variable of :data:`KERNEL_ENV` that is set. Two CPUs
    that both run ATen's AVX512 kernels (an AMD EPYC and an Intel Xeon with AMX) still round
    differently in oneDNN/MKL, so the vector level alone is not enough. ``cpuinfo`` stands in
    for ``/proc/cpuinfo`` (tests)."""
    import cv2

    env = " ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if os.environ.get(k))
    return "|".join([torch.__version__, f"cv2 {cv2.__version__}", f"numpy {np.__version__}",
                     torch.backends.cpu.get_cpu_capability(), platform.machine(),
                     cpu_description(cpuinfo)] + ([env] if env else []))


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


# Tolerance where bit-identity is not promised: float kernels of other CPUs differ in the last
# bits (seen: up to 5e-6 on logits of magnitude ~1 with AVX2 kernels on an AVX-512 CPU).
RTOL, ATOL = 1e-4, 1e-5


def compare(pinned: dict, current: dict[str, dict[str, dict]], key: str | None = None) -> str:
    """Check ``current`` (from :func:`compute`) against the ``pinned`` fixture and say how:
    ``"bit-identical"`` (SHA-256 of every tensor) when ``key`` (default: this machine's
    :func:`platform_key`) is the one the fixture was recorded with, else ``"tolerance"``:
    floats within :data:`RTOL`/:data:`ATOL`, integers exactly, except the detectors'
    eval-mode detections (ranking and NMS are discontinuous in rounding; random weights give
    many near-tied scores), whose losses are still compared. Raises ``AssertionError``
    naming the first output that differs."""
    exact = pinned["platform"] == (platform_key() if key is None else key)
    expected = pinned["outputs"]
    assert sorted(current) == sorted(expected)
    for model, outputs in expected.items():
        assert sorted(current[model]) == sorted(outputs), model
        for name, want in outputs.items():
            got = current[model][name]
            where = f"{model}.{name}"
            assert (got["dtype"], got["shape"]) == (want["dtype"], want["shape"]), where
            if exact:
                assert got["sha256"] == want["sha256"], f"{where} changed"
            elif name.startswith("eval"):
                continue
            elif not want["sample"].is_floating_point():
                assert torch.equal(got["sample"], want["sample"]), f"{where} changed"
            else:
                torch.testing.assert_close(got["sample"], want["sample"], rtol=RTOL, atol=ATOL,
                                           msg=where)
    return "bit-identical" if exact else "tolerance"


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
