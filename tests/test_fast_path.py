"""The accuracy guard of the fast path (:mod:`denseclip.runtime`): fast kernels in fp32
compute the reference function, and bf16 autocast keeps the decisions of the reference
fp32 model — for tiny variants of the six segmentation presets, both detectors, training,
the :class:`~denseclip.Predictor` and ``denseclip test --compare-precision``.

None of these comparisons is exact, and none can be: two computation paths (fast vs
reference kernels, bf16 vs fp32) differ by rounding, and by a different rounding with each
CPU's kernels. The bounds are set on what every CPU shares: in fp32 a summation order, in
bf16 the rounding of the operands to 8 significant bits (every x86 bf16 kernel, AVX-512
BF16, AMX tiles and the emulation on older CPUs alike, accumulates in fp32). Measured with
torch 2.14 on an AVX-512 BF16 CPU with its own kernels and with the AVX-512-without-BF16,
AVX2 and SSE4.1 kernels (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``,
``MKL_ENABLE_INSTRUCTIONS``): the segmentation agreement was 99.70-99.88 % and the
relative error 0.55-0.85 % under every one (AMX was not at hand; it rounds the operands
the same way), so the bounds below are not tuned to one CPU.

Tolerances (the bounds leave margin):

* fast kernels, fp32: max |Δlogit| <= 1e-4 absolute + 1e-4 relative (measured <= 3.6e-7
  of the logit range);
* bf16 + fast kernels against fp32 reference: argmax agreement >= 99.5 % of pixels
  (measured 99.70-99.88 %) and max |Δlogit| <= 2.5 % of the reference logit range
  (measured 0.55-0.85 %); detector head outputs and FPN levels within 2.5 % of their
  range (measured <= 0.91 %), classification signs agreeing on >= 99.5 % (measured
  99.79-99.82 % RetinaNet, 99.83-99.87 % RPN);
* training: the mean loss of the last 10 of 100 steps in bf16 within 5 % of fp32's
  (measured 1.1 %).
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import denseclip
from denseclip import Predictor
from denseclip.cli import main
from denseclip.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset, synthetic_sample
from denseclip.engine import trainer
from denseclip.engine.optim import build_optimizer
from denseclip.runtime import fast_kernels, prepare_model, resolve_precision, run_mode
from denseclip.weights import save_checkpoint
from tests.helpers.weights import randomise_batchnorm

AGREEMENT = 0.995  # argmax / sign agreement of bf16 with the fp32 reference
BF16_REL_TOL = 0.025  # max |Δ| of bf16 outputs, relative to the reference's value range
FP32_TOL = 1e-4  # fast kernels in fp32: abs and rel

# ------------------------------------------------------------------ tiny presets
_SMALL = ["model.text.width=32", "model.text.layers=2", "model.text.heads=2",
          "model.guidance.decoder_width=32", "model.guidance.decoder_heads=2",
          "model.guidance.decoder_layers=1", "model.neck_channels=32", "model.head_channels=32"]
# ResNets: 8-channel stems (attention pool width 8 * 32 = 256, 2 heads); RN101 keeps a
# deeper third stage and its smaller embedding than RN50, as the presets do.
_RN = ["model.backbone.width=8", "model.backbone.heads=2", "model.backbone.input_resolution=64"]
_RN50 = [*_RN, "model.backbone.layers=[1,1,2,1]", "model.backbone.embed_dim=64"]
_RN101 = [*_RN, "model.backbone.layers=[1,1,3,1]", "model.backbone.embed_dim=32"]
# ViT-B/16 -> 4 blocks of width 32, patch 16 kept; every block feeds the pyramid.
_VIT = ["model.backbone.layers=[4]", "model.backbone.width=32", "model.backbone.heads=2",
        "model.backbone.embed_dim=32", "model.backbone.input_resolution=64",
        "model.backbone.out_indices=[0,1,2,3]"]
TINY = {
    "fpn_clipres50_512x512_80k": _RN50,
    "denseclip_fpn_res50_512x512_80k": _RN50,
    "fpn_clipres101_512x512_80k": _RN101,
    "denseclip_fpn_res101_512x512_80k": _RN101,
    "fpn_clipvit-b_640x640_80k": _VIT,
    "denseclip_fpn_vit-b_640x640_80k": _VIT,
}
SIZE = 64  # input side (a multiple of the ViT patch and of the coarsest stride)
# What the tiny variants keep of each preset (everything but widths and depths).
KEPT = ["model.task", "model.classes", "model.backbone.type", "model.backbone.embeddings",
        "model.backbone.pos_embed", "model.backbone.patch_size",
        "model.backbone.cls_embed_once", "model.backbone.drop_path_rate",
        "model.backbone.drop_path_mode", "model.text.context_length", "model.text.n_ctx",
        "model.text.vocab_size", "model.guidance.enabled", "model.guidance.prompting",
        "model.guidance.score_level", "model.guidance.tau", "model.guidance.gamma_init",
        "model.head_dropout", "model.align_corners", "data.mean", "data.std"]


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def tiny_config(preset: str):
    return denseclip.load_config(preset, [*TINY[preset], *_SMALL])


def scenes(cfg, seeds, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic street scenes (:mod:`denseclip.data.synthetic`) normalised as the test
    pipeline does, and their labels (0 = other, 1..5 = sky, grass, road, building, water)."""
    pairs = [synthetic_sample(np.random.default_rng([3, s]), (size, size)) for s in seeds]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float()
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
    return (images - mean) / std, torch.from_numpy(np.stack([p[1] for p in pairs])).long()


# The synthetic classes' indices in the ADE20K list (sky, grass, road, building, water).
ADE_INDEX = torch.tensor([2, 9, 6, 1, 21])


def fit_head(model, cfg, seeds=range(100, 108), ridge: float = 1.0) -> None:
    """Replace the random classifier ``head.conv_seg`` by a least-squares linear probe
    fitted on the reference model's own features of synthetic scenes.

    Why: a random classifier scores 150 classes with random projections, so at nearly
    every pixel the top two logits are close (the expected gap between the two largest of
    150 Gaussian scores is about 0.3 standard deviations) and bf16's rounding — relative to
    the activations, about 0.4 % of the logits' spread, the same whatever scale the weights
    have, so scaling conv_seg up changes nothing — flips the argmax on ~1 % of the pixels
    (agreement 98.5-99.6 % measured). A trained head has decision margins instead; a ridge
    regression of one-hot scene labels (as ADE20K classes) on the fp32 reference features
    is the cheapest trained head. The rest of the network stays random."""
    images, labels = scenes(cfg, seeds)
    features = []
    hook = model.head.conv_seg.register_forward_hook(
        lambda mod, inputs, out: features.append(inputs[0].detach()))
    try:
        with torch.no_grad(), run_mode("fp32", "reference", "cpu"):
            model.eval()(images)
    finally:
        hook.remove()
    f = features[0]  # (B, C, h, w) at stride 4
    y = F.interpolate(labels[:, None].float(), size=f.shape[-2:], mode="nearest").long()
    y = y.flatten()
    x = torch.cat([f.permute(0, 2, 3, 1).reshape(y.numel(), -1),
                   torch.ones(y.numel(), 1)], dim=1).double()
    keep = y > 0  # "other" is unlabelled, as ADE20K's label 0
    x, y = x[keep], y[keep] - 1
    target = torch.zeros(len(y), model.num_classes, dtype=torch.double)
    target[torch.arange(len(y)), ADE_INDEX[y]] = 1.0
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram, x.T @ target).T.float()  # (K, C + 1)
    conv = model.head.conv_seg
    with torch.no_grad():
        conv.weight.copy_(w[:, :-1].reshape(conv.weight.shape))
        conv.bias.copy_(w[:, -1])


def build_tiny(preset: str) -> tuple[object, nn.Module]:
    cfg = tiny_config(preset)
    torch.manual_seed(0)
    model = denseclip.build_model(cfg).eval()
    randomise_batchnorm(model)
    return cfg, model


def logits_in(model, images, precision: str, kernels: str) -> torch.Tensor:
    prepare_model(model, kernels)
    with torch.no_grad(), run_mode(precision, kernels, "cpu"):
        out = model(images)
    prepare_model(model, "fast")
    return out


def argmax_agreement(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> float:
    return (a.argmax(dim) == b.argmax(dim)).float().mean().item()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| over the range of ``expected``."""
    spread = (expected.max() - expected.min()).item()
    assert spread > 0
    return (actual.float() - expected).abs().max().item() / spread


# ------------------------------------------------------------------ segmentation
@pytest.mark.parametrize("preset", list(TINY))
def test_tiny_variant_keeps_the_preset_architecture(preset):
    full, tiny = denseclip.load_config(preset), tiny_config(preset)
    for key in KEPT:
        assert _get(tiny, key) == _get(full, key), key
    assert tiny.model.classes == "ade20k"
    assert len(tiny.model.backbone.layers) == len(full.model.backbone.layers)
    assert SIZE % tiny.model.backbone.patch_size == 0


@pytest.mark.parametrize("preset", list(TINY))
def test_fast_kernels_fp32_equal_the_reference(preset):
    cfg, model = build_tiny(preset)
    images, _ = scenes(cfg, range(8))
    ref = logits_in(model, images, "fp32", "reference")
    fast = logits_in(model, images, "fp32", "fast")
    assert ref.shape == (8, 150, SIZE, SIZE) and fast.dtype == torch.float32
    conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # really ran fast
    torch.testing.assert_close(fast, ref, rtol=FP32_TOL, atol=FP32_TOL)
    assert argmax_agreement(fast, ref) > 0.9999


@pytest.mark.parametrize("preset", list(TINY))
def test_bf16_fast_path_keeps_the_reference_decisions(preset):
    """bf16 autocast + fast kernels against the fp32 reference, on 32 held-out scenes:
    argmax agreement >= 99.5 % of the pixels, max |Δlogit| <= 2.5 % of the reference
    logit range (measured 99.70-99.87 % and 0.55-0.84 %; see :func:`fit_head` for why the
    classifier is fitted)."""
    cfg, model = build_tiny(preset)
    fit_head(model, cfg)
    images, _ = scenes(cfg, range(32))
    ref = logits_in(model, images, "fp32", "reference")
    bf16 = logits_in(model, images, "bf16", "fast")
    assert bf16.dtype == torch.float32  # the segmentor returns fp32 logits
    assert not torch.equal(bf16, ref)  # bf16 did run
    assert argmax_agreement(bf16, ref) >= AGREEMENT
    assert relative_error(bf16, ref) <= BF16_REL_TOL


# ------------------------------------------------------------------ detection
DETECTORS = ["tiny_retinanet_denseclip", "tiny_mask_rcnn_denseclip"]


def _detector(name: str, *overrides: str):
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config(name, list(overrides))).eval()
    randomise_batchnorm(model)
    return model


def _dense_outputs(model, images, precision, kernels) -> dict[str, list[torch.Tensor]]:
    """The network before post-processing: FPN levels and the dense head outputs."""
    prepare_model(model, kernels)
    with torch.no_grad(), run_mode(precision, kernels, "cpu"):
        pyramid = model.extract_features(images)[0]
        out = model.forward_dummy(images)
    prepare_model(model, "fast")
    if isinstance(out, dict):  # RetinaNet: logits (B, N, K) and deltas (B, N, 4)
        return {"fpn": pyramid, "cls": [out["cls_logits"]], "deltas": [out["bbox_regression"]]}
    n = len(pyramid)  # Mask R-CNN: RPN objectness and deltas per level, then the RoI heads
    return {"fpn": pyramid, "cls": list(out[:n]), "deltas": list(out[n:2 * n]),
            "roi": list(out[2 * n:])}


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_dense_outputs_in_bf16_match_the_reference(name):
    model = _detector(name)
    images = torch.randn(4, 3, 128, 160, generator=torch.Generator().manual_seed(2))
    ref = _dense_outputs(model, images, "fp32", "reference")
    bf16 = _dense_outputs(model, images, "bf16", "fast")
    fast32 = _dense_outputs(model, images, "fp32", "fast")
    for key in ref:
        for r, b, f in zip(ref[key], bf16[key], fast32[key], strict=True):
            torch.testing.assert_close(f, r, rtol=FP32_TOL, atol=FP32_TOL)
            assert relative_error(b, r) <= BF16_REL_TOL, key
    # Classification (sigmoid per anchor and class, RPN objectness): same side of 0.5.
    r = torch.cat([t.flatten() for t in ref["cls"]])
    b = torch.cat([t.flatten() for t in bf16["cls"]]).float()
    assert not torch.equal(b, r)
    assert ((b > 0) == (r > 0)).float().mean().item() >= AGREEMENT


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_eval_forward_in_bf16_returns_float32_detections(name):
    model = _detector(name, "model.detection.score_thresh=0.0")  # detections despite noise
    prepare_model(model, "fast")
    gen = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 100, 140, generator=gen), torch.rand(3, 120, 90, generator=gen)]
    with torch.no_grad(), run_mode("bf16", "fast", "cpu"):
        detections = model(images)
    assert len(detections) == 2
    for det, img in zip(detections, images, strict=True):
        assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32
        assert len(det["boxes"]) > 0 and torch.isfinite(det["boxes"]).all()
        assert det["labels"].dtype == torch.int64
        h, w = img.shape[-2:]
        assert (det["boxes"][:, 2] <= w + 1e-3).all() and (det["boxes"][:, 3] <= h + 1e-3).all()
        if "masks" in det:
            assert det["masks"].dtype == torch.float32
            assert det["masks"].shape[-2:] == (h, w)


# ------------------------------------------------------------------ training
STEPS = 100


@pytest.fixture(scope="module")
def synthetic_classes(tmp_path_factory):
    path = tmp_path_factory.mktemp("classes") / "classes.txt"
    path.write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    return path


def _train(cfg, precision: str) -> tuple[nn.Module, list[float]]:
    """``STEPS`` AdamW steps of the training loop's forward/backward on a fixed set of four
    synthetic batches (2 × 64 × 64), under the trainer's autocast and kernels."""
    cfg = copy.deepcopy(cfg)
    cfg.amp = {"fp32": "none", "bf16": "bf16"}[precision]
    batches = []
    for b in range(4):
        images, labels = scenes(cfg, [1000 + 2 * b, 1001 + 2 * b])
        labels = labels - 1  # reduce_zero_label: other -> ignored, classes 0..4
        labels[labels < 0] = cfg.model.ignore_index
        batches.append((images, labels))
    torch.manual_seed(0)
    model = prepare_model(denseclip.build_model(cfg), cfg.kernels).train()
    optimizer = build_optimizer(model, cfg.optim)
    device = torch.device("cpu")
    losses = []
    for step in range(STEPS):
        images, labels = batches[step % len(batches)]
        with trainer._train_mode(cfg, device):
            assert torch.is_autocast_enabled("cpu") == (precision == "bf16")
            loss = sum(model(images, labels).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.fixture(scope="module")
def trained(synthetic_classes):
    """tiny_denseclip_res on the five synthetic classes, trained in fp32 and in bf16
    (lr 1e-3, ten times the preset's, so that 100 steps move far from the start)."""
    cfg = denseclip.load_config("tiny_denseclip_res",
                                [f"model.classes={synthetic_classes}", "optim.lr=1e-3"])
    fp32_model, fp32_losses = _train(cfg, "fp32")
    _, bf16_losses = _train(cfg, "bf16")
    return {"cfg": cfg, "model": fp32_model, "fp32": fp32_losses, "bf16": bf16_losses}


def test_bf16_training_reaches_the_fp32_loss(trained):
    fp32, bf16 = trained["fp32"], trained["bf16"]
    assert fp32 != bf16  # bf16 did change the arithmetic
    assert all(np.isfinite(bf16))
    assert np.mean(fp32[-10:]) < 0.5 * np.mean(fp32[:10])  # it did train
    final_fp32, final_bf16 = np.mean(fp32[-10:]), np.mean(bf16[-10:])
    assert abs(final_bf16 - final_fp32) <= 0.05 * final_fp32


# ------------------------------------------------------------------ predictor and CLI
@pytest.fixture(scope="module")
def fitted():
    """tiny_denseclip_res (ADE20K's 150 classes) with the fitted classifier of
    :func:`fit_head`.

    Not the model trained above: 100 steps leave a tiny network whose bf16 label maps
    agree with fp32 on only ~99.3 % of the pixels (99.0-99.6 % with the reference kernels
    in bf16 as well: bf16 itself, not the fast path; its BatchNorms amplify the rounding
    of the activations to 1-3 % of their range)."""
    cfg = denseclip.load_config("tiny_denseclip_res")
    torch.manual_seed(0)
    model = denseclip.build_model(cfg).eval()
    randomise_batchnorm(model)
    fit_head(model, cfg)
    return cfg, model


def test_predictor_bf16_and_fp32_label_maps_agree(fitted):
    cfg, model = fitted
    image = synthetic_sample(np.random.default_rng(4321), (96, 128))[0]
    results = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor.from_model(copy.deepcopy(model), cfg, precision=precision)
        assert predictor.precision == precision
        results[precision] = predictor.predict(image)
    assert fast_kernels()  # the predictor's mode does not leak
    a, b = results["fp32"], results["bf16"]
    assert a.labels.shape == b.labels.shape == (96, 128)
    assert len(np.unique(a.labels)) >= 2  # not a constant map
    assert (a.labels == b.labels).mean() >= AGREEMENT
    assert not np.array_equal(a.probs, b.probs)  # bf16 did run


def test_predictor_reports_the_resolved_precision(fitted):
    cfg, model = fitted
    auto = Predictor.from_model(copy.deepcopy(model), cfg, precision="auto")
    assert auto.precision == resolve_precision("auto", "cpu")
    default = Predictor.from_model(copy.deepcopy(model), cfg)  # the config's: auto
    assert cfg.precision == "auto" and default.precision == auto.precision
    forced = copy.deepcopy(cfg)
    forced.precision = "fp32"
    assert Predictor.from_model(copy.deepcopy(model), forced).precision == "fp32"
    assert Predictor.from_model(copy.deepcopy(model), forced, precision="bf16").precision \
        == "bf16"  # the argument wins over the config
    with pytest.raises(ValueError, match="fp64"):
        Predictor.from_model(copy.deepcopy(model), cfg, precision="fp64")


def test_cli_test_compares_precisions(trained, tmp_path, capsys):
    root = make_synthetic_dataset(tmp_path / "data", num_train=0, num_val=3, size=(64, 80),
                                  seed=0)
    ckpt = save_checkpoint(tmp_path / "model.pth", trained["model"])
    code = main(["test", "tiny_denseclip_res", str(ckpt), "--device", "cpu", "--no-progress",
                 "--compare-precision", "bf16", f"data.root={root}",
                 f"model.classes={root}/classes.txt", "optim.lr=1e-3"])
    assert code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "fp32 vs bf16:" in lines
    start = lines.index("fp32 vs bf16:")
    pattern = re.compile(r"^  (\w+): (\d+\.\d\d) \(fp32\) (\d+\.\d\d) \(bf16\) "
                         r"delta ([+-]\d+\.\d\d)$")
    rows = {}
    for line in lines[start + 1:]:
        match = pattern.match(line)
        assert match, line
        rows[match[1]] = (float(match[2]), float(match[3]), float(match[4]))
    assert set(rows) == {"mIoU", "mAcc", "aAcc"}
    for a, b, delta in rows.values():
        assert delta == pytest.approx(b - a, abs=0.0151)  # three roundings to 0.01
        assert abs(delta) <= 2.0  # bf16 barely moves the metrics of a trained model
