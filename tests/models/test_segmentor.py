"""The segmentor built from every preset: outputs, losses, gradients, sizes, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import denseclip
from denseclip.models import Segmentor, tokenize
from denseclip.models.seg_inference import InferenceSettings, mode_logits

TINY = ["tiny_denseclip_res", "tiny_clip_res", "tiny_denseclip_vit", "tiny_clip_vit"]
CASES = [(name, ()) for name in TINY] + [
    (name, ("model.guidance.prompting=pre",)) for name in TINY if "denseclip" in name
]
CASE_IDS = [name + ("-pre" if overrides else "") for name, overrides in CASES]

# Parameters whose gradient is zero by construction, whatever the data:
#  - a key bias in attention adds the same amount to every logit of a query row, which the
#    softmax cancels;
#  - a per-channel bias right before a BatchNorm in training mode is removed by the batch
#    mean.
STRUCTURALLY_ZERO_GRAD = {"backbone.attnpool.k_proj.bias", "backbone.fpn1.1.bias"}

# DESIGN §8: parameters excluding the text encoder, and every parameter (text encoder
# included), in millions.
PARAMS = {
    "fpn_clipres50_512x512_80k": (31.043, 31.043),
    "denseclip_fpn_res50_512x512_80k": (50.248, 113.906),
    "fpn_clipres101_512x512_80k": (50.035, 50.035),
    "denseclip_fpn_res101_512x512_80k": (67.795, 131.191),
    "fpn_clipvit-b_640x640_80k": (101.283, 101.283),
    "denseclip_fpn_vit-b_640x640_80k": (105.273, 168.669),
}


def build(name: str, overrides=(), seed: int = 0) -> Segmentor:
    torch.manual_seed(seed)
    return denseclip.build_model(denseclip.load_config(name, list(overrides)))


def batch(b: int = 2, h: int = 64, w: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g)
    targets = torch.randint(0, 150, (b, h, w), generator=g)
    targets[:, :4] = 255  # some ignored pixels
    return images, targets


@pytest.fixture(scope="module")
def tiny_res() -> Segmentor:
    return build("tiny_denseclip_res").eval()


# ------------------------------------------------------------------ every tiny preset


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_eval_output_is_per_class_logits_at_input_size(name, overrides):
    model = build(name, overrides).eval()
    images, _ = batch()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 150, 64, 96)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_training_losses_and_gradients(name, overrides):
    model = build(name, overrides).train()
    images, targets = batch()
    losses = model(images, targets)
    guided = model.guidance is not None
    assert set(losses) == ({"loss_seg", "loss_aux"} if guided else {"loss_seg"})
    for key, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), key
        assert value.item() > 0, key
    sum(losses.values()).backward()

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for n, p in trainable.items():
        assert p.grad is not None, f"{n} received no gradient"
        if n not in STRUCTURALLY_ZERO_GRAD:
            assert p.grad.abs().max() > 0, f"{n} has an all-zero gradient"
        assert torch.isfinite(p.grad).all(), n

    if guided:
        encoder = model.guidance.text_encoder
        for n, p in encoder.named_parameters():  # trainable, as in the official runs
            assert p.requires_grad and p.grad is not None, n
        if model.guidance.prompting == "post":
            contexts = model.guidance.contexts
            assert model.guidance.gamma.grad.abs().max() > 0
        else:
            contexts = model.guidance.prompt_generator.queries
        assert contexts.requires_grad
        assert contexts.grad.abs().max() > 0  # reached through the text encoder


@pytest.mark.parametrize("name", TINY)
def test_odd_input_sizes(name):
    model = build(name).eval()
    with torch.no_grad():
        for size in [(70, 100), (32, 33), (97, 64)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 150, *size)


def test_eval_output_does_not_mix_the_batch(tiny_res):
    images, _ = batch(b=3)
    with torch.no_grad():
        together = tiny_res(images)
        alone = tiny_res(images[1:2])
    # Batch 3 vs batch 1 may pick other kernels (blocking, summation order): equal up to
    # rounding, not bit for bit. Measured |diff| <= 1.3e-6 (under a tenth of this bound)
    # with AVX-512, AVX2 and SSE4.1 kernels; mixing the batch changes logits by O(1).
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-4)


def test_score_map_is_concatenated_at_the_configured_level():
    res = build("tiny_denseclip_res")
    assert [c.in_channels for c in res.neck.lateral_convs] == [32, 64, 128, 256 + 150]
    vit = build("tiny_denseclip_vit")
    assert [c.in_channels for c in vit.neck.lateral_convs] == [32, 32, 32 + 150, 32]
    base = build("tiny_clip_vit")
    assert [c.in_channels for c in base.neck.lateral_convs] == [32, 32, 32, 32]
    assert base.guidance is None and base.class_names is None
    assert base.backbone.proj is None  # baselines build no ln_post/projection


def test_pre_model_prompting_makes_text_depend_on_the_image():
    model = build("tiny_denseclip_res", ["model.guidance.prompting=pre"]).eval()
    assert not hasattr(model.guidance, "contexts")
    images, _ = batch(b=2)
    with torch.no_grad():
        out = model.forward_features(images).guided
    assert out.text.shape == (2, 150, 32)
    assert not torch.allclose(out.text[0], out.text[1])


def test_set_classes():
    model = build("tiny_denseclip_res").eval()
    names = list(reversed(model.class_names))
    before = model.guidance.tokens.clone()
    model.set_classes(names)
    assert model.class_names == names
    assert not torch.equal(model.guidance.tokens, before)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 150, 64, 64)
    with pytest.raises(ValueError, match="149 class names given, but the decode head predicts "
                                         "150 classes"):
        model.set_classes(names[:-1])
    with pytest.raises(ValueError, match="no text guidance"):
        build("tiny_clip_res").set_classes(names)


# ------------------------------------------------------------------- full-size models


@pytest.fixture
def shapes_only(monkeypatch):
    """Counting parameters needs their shapes only: skip the (slow) weight initialisers."""
    for fn in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_",
               "zeros_", "ones_", "constant_"):
        monkeypatch.setattr(torch.nn.init, fn, lambda tensor, *args, **kwargs: tensor)


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_match_the_official_models(name, shapes_only):
    model = build(name)
    total = sum(p.numel() for p in model.parameters())
    text = 0
    if model.guidance is not None:
        text = sum(p.numel() for p in model.guidance.text_encoder.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    excl_text, everything = PARAMS[name]
    assert abs((total - text) / 1e6 - excl_text) < 0.01
    assert abs(total / 1e6 - everything) < 0.01
    assert trainable == total  # the text encoder too (lr ×0; see optim.custom_keys)


def test_model_zoo_and_tiny_presets_are_available():
    assert set(PARAMS) | set(TINY) <= set(denseclip.available_presets())


# ------------------------------------------------------------------------- bad input


def test_images_must_be_a_batch(tiny_res):
    with pytest.raises(ValueError, match=r"batch of shape \(B, 3, H, W\).*images\[None\]"):
        tiny_res(torch.randn(3, 64, 64))


def test_images_must_have_three_channels(tiny_res):
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        tiny_res(torch.randn(1, 1, 64, 64))


def test_images_must_be_floating_point(tiny_res):
    with pytest.raises(TypeError, match="floating-point.*uint8"):
        tiny_res(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_images_must_not_be_smaller_than_the_stride(tiny_res):
    with pytest.raises(ValueError, match="smaller than the network stride 32"):
        tiny_res(torch.randn(1, 3, 16, 64))


def test_images_must_be_a_tensor(tiny_res):
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiny_res([[0.0]])


def test_targets_must_match_the_batch():
    model = build("tiny_clip_res").train()
    images, targets = batch(b=2)
    with pytest.raises(ValueError, match=r"targets must be \(B, H, W\)"):
        model(images, targets[:1])
    with pytest.raises(ValueError, match=r"targets must be \(B, H, W\)"):
        model(images, targets[:, None])


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(denseclip.ConfigError, match="unknown preset 'no_such_model'") as info:
        denseclip.load_config("no_such_model")
    message = str(info.value)
    assert "available presets" in message
    for name in denseclip.available_presets():
        assert name in message


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("model.backbone.type=convnext", "model.backbone.type: unknown backbone 'convnext'; "
                                         "registered: resnet, vit, torchvision, timm"),
        ("model.backbone.layers=[1,1,1]", "a ResNet needs 4 stages"),
        ("model.guidance.score_level=4", r"score_level=4: must be in \[0, 3\]"),
        ("model.task=detection", "'detection' is not one of 'segmentation'"),
        ("model.guidance.prompting=middle", "'middle' is not one of 'post', 'pre'"),
    ],
)
def test_invalid_model_settings_are_reported(override, phrase):
    with pytest.raises(ValueError, match=phrase):
        build("tiny_denseclip_res", [override])


def test_guidance_needs_the_embeddings():
    with pytest.raises(denseclip.ConfigError, match="needs model.backbone.embeddings"):
        build("tiny_denseclip_res", ["model.backbone.embeddings=false"])


def test_neck_and_head_convs_follow_mmcv_conv_module_init():
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config("fpn_clipres50_512x512_80k"))
    conv = model.neck.fpn_convs[0]  # 256 -> 256, 3x3: fan-out = 256 * 9
    assert conv.bias.abs().max() == 0
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    head_conv = model.head.scale_heads[3][0].conv
    assert head_conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    # The classifier is a plain conv: PyTorch's default (uniform, bound 1/sqrt(fan_in)).
    bound = 1 / 256**0.5
    assert model.head.conv_seg.weight.abs().max() <= bound
    assert model.head.conv_seg.bias.abs().max() > 0


# ------------------------------------------------------------------ test-time inference


def test_the_model_holds_the_test_settings_of_its_config():
    cfg = denseclip.load_config("tiny_denseclip_res", [
        "evaluation.mode=whole", "evaluation.aug_ratios=[0.5, 1.5]", "evaluation.aug_flip=false",
        "data.test_scale=[96, 48]"])
    torch.manual_seed(0)
    settings = denseclip.build_model(cfg).inference_settings
    assert settings == InferenceSettings(
        mode="whole", crop_size=tuple(cfg.evaluation.crop_size),
        stride=tuple(cfg.evaluation.stride), aug_ratios=(0.5, 1.5), aug_flip=False,
        test_scale=(96, 48), mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))


def test_inference_follows_the_settings_mode(tiny_res):
    images = batch(1, 64, 150)[0]
    with torch.no_grad():
        whole = tiny_res(images)
    model = copy.deepcopy(tiny_res)
    model.inference_settings = InferenceSettings(mode="whole")
    assert torch.equal(model.inference(images), whole)
    model.inference_settings = InferenceSettings(mode="slide", crop_size=(64, 64),
                                                 stride=(43, 43))
    slide = model.inference(images, (32, 75))
    with torch.no_grad():
        expected = mode_logits(tiny_res, images, model.inference_settings, 150, (32, 75))
        first = tiny_res(images[..., :64])  # three windows: x = 0, 43, 86
    assert torch.equal(slide, expected) and slide.shape == (1, 150, 32, 75)
    assert not torch.allclose(slide, F.interpolate(whole, size=(32, 75), mode="bilinear"))
    # the first 43 columns are seen by the first window only
    torch.testing.assert_close(model.inference(images)[..., :43], first[..., :43],
                               rtol=0, atol=1e-5)


def test_open_texts_add_score_channels_from_the_same_forward(tiny_res):
    images = batch(2, 64, 64)[0]
    model = copy.deepcopy(tiny_res)
    model.inference_settings = InferenceSettings(mode="whole")
    out = model.inference(images, open_texts=["cat", "dog", "grass"])
    assert out.shape == (2, 153, 64, 64)
    with torch.no_grad():
        assert torch.equal(out[:, :150], tiny_res(images))
        dense = tiny_res.forward_features(images)
        text = tiny_res.guidance.text_encoder(tokenize(["cat", "dog", "grass"], 5),
                                              tiny_res.guidance.contexts)
        scores = tiny_res.forward_scores(dense, (64, 64), text=text)
    torch.testing.assert_close(out[:, 150:], scores, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no text guidance"):
        build("tiny_clip_res").eval().inference(images, open_texts=["cat"])
