"""Zero-shot segmentation from CLIP weights (MaskCLIP) against open_clip's own modules, on
small random CLIP models saved in OpenAI's key layout; the presets through the predictor
and the ``predict``/``test``/``train`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image

import denseclip
from denseclip.cli import main
from denseclip.data import make_synthetic_dataset
from denseclip.inference import PredictionError, Predictor
from denseclip.models.zeroshot import (
    LOGIT_SCALE,
    PROMPT_TEMPLATES,
    NotTrainableError,
    ZeroShotSegmentor,
)
from denseclip.weights import load_checkpoint
from tests.helpers.images import random_image
from tests.helpers.weights import randomise_batchnorm

ATOL = 1e-5
PRESETS = {"rn50": "clip_zeroshot_rn50", "vit": "clip_zeroshot_vit-b"}
CLASSES = "sky\ngrass\ntv: television receiver\n"  # the third class embeds its text
TEXT = ["model.text.width=32", "model.text.layers=2", "model.text.heads=2"]
SIZES = {
    "rn50": ["model.backbone.layers=[1,1,1,1]", "model.backbone.width=8",
             "model.backbone.heads=4", "model.backbone.embed_dim=32"],
    "vit": ["model.backbone.layers=[2]", "model.backbone.width=64", "model.backbone.heads=2",
            "model.backbone.embed_dim=32", "model.backbone.input_resolution=64"],
}
# 64x64 images stay 64x64 under this test scale, so the predictor's input is the image.
PIPELINE = ["data.test_scale=[128,64]", "evaluation.mode=whole", "data.num_workers=0"]


def _open_clip(kind: str) -> torch.nn.Module:
    """A small CLIP built by open_clip (QuickGELU, as OpenAI's), with random weights."""
    torch.manual_seed(0)
    if kind == "rn50":
        vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=64, image_size=64)
    else:
        vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=64)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    model = open_clip.model.CLIP(32, vision, text, quick_gelu=True).eval()
    if kind == "rn50":
        randomise_batchnorm(model.visual, seed=1)
    return model


def _saved(kind: str, root: Path) -> tuple:
    """(kind, open_clip model, its state dict file, config overrides)."""
    model = _open_clip(kind)
    path = root / "clip.pt"
    torch.save(model.state_dict(), path)  # open_clip's CLIP keys are OpenAI's
    classes = root / "classes.txt"
    classes.write_text(CLASSES)
    return kind, model, path, [*SIZES[kind], *TEXT, f"model.classes={classes}", *PIPELINE]


@pytest.fixture(scope="module", params=["rn50", "vit"])
def clip(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory.mktemp(f"zeroshot_{request.param}"))


@pytest.fixture(scope="module")
def rn50(tmp_path_factory):
    """The ResNet only: enough for the commands."""
    return _saved("rn50", tmp_path_factory.mktemp("zeroshot_cli"))


def _build(kind: str, overrides: list[str], path: Path):
    model = denseclip.build_model(denseclip.load_config(PRESETS[kind], overrides))
    return model, load_checkpoint(model, path)


@torch.no_grad()
def _reference_dense(kind: str, oc: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's dense embeddings (B, D, h, w) computed with open_clip's modules."""
    v = oc.visual
    if kind == "rn50":
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
        B, _, h, w = x.shape
        tokens = v.attnpool.c_proj(v.attnpool.v_proj(x.flatten(2).transpose(1, 2)))
        return tokens.transpose(1, 2).reshape(B, -1, h, w)
    assert v.transformer.batch_first
    x = v._embeds(images)  # (B, 1 + hw, C)
    *blocks, last = v.transformer.resblocks
    for block in blocks:
        x = block(x)
    C = x.shape[-1]
    value = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * C:],
                     last.attn.in_proj_bias[2 * C:])
    x = x + last.ls_1(last.attn.out_proj(value))
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    out = (v.ln_post(x) @ v.proj)[:, 1:]  # the patch tokens
    side = int(out.shape[1] ** 0.5)
    return out.transpose(1, 2).reshape(images.shape[0], -1, side, side)


@torch.no_grad()
def _reference_classes(oc: torch.nn.Module, texts: list[str]) -> torch.Tensor:
    """CLIP's zero-shot recipe with open_clip: normalise, average, normalise."""
    out = []
    for text in texts:
        emb = oc.encode_text(open_clip.tokenize([t.format(text) for t in PROMPT_TEMPLATES]))
        out.append(F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(out)


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------- parity


def test_openai_file_loads_strictly_and_unused_keys_are_reported(clip):
    kind, _, path, overrides = clip
    model, report = _build(kind, overrides, path)
    assert isinstance(model, ZeroShotSegmentor)
    assert report.format == "openai" and report.new == [] and report.resized == []
    unused = {"logit_scale"}
    if kind == "rn50":  # the pool's query/key attention is not MaskCLIP's path
        unused |= {"visual.attnpool.positional_embedding", "visual.attnpool.q_proj.weight",
                   "visual.attnpool.q_proj.bias", "visual.attnpool.k_proj.weight",
                   "visual.attnpool.k_proj.bias"}
    assert set(report.ignored) == unused
    assert "ignored" in str(report)
    assert not model.training


def test_dense_embeddings_are_the_value_path_of_open_clip(clip):
    kind, oc, path, overrides = clip
    model, _ = _build(kind, overrides, path)
    images = _images()
    expected = _reference_dense(kind, oc, images)
    with torch.no_grad():
        dense = model.backbone(images)
        normalised = model.forward_features(images).features[0]
    stride = 32 if kind == "rn50" else 16
    assert dense.shape == (2, 32, 64 // stride, 64 // stride)
    assert expected.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(dense, expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(normalised, F.normalize(expected, dim=1), atol=ATOL, rtol=ATOL)


def test_class_embeddings_are_open_clips_template_ensemble(clip):
    kind, oc, path, overrides = clip
    model, _ = _build(kind, overrides, path)
    assert model.class_names == ["sky", "grass", "tv"]
    assert model.class_texts == ["sky", "grass", "television receiver"]
    expected = _reference_classes(oc, model.class_texts)
    got = model.class_embeddings()
    assert got.shape == (3, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)
    assert model.class_embeddings() is got  # cached until the weights change
    with torch.no_grad():
        model.guidance.text_encoder.ln_final.weight.mul_(2.0)
    assert model.class_embeddings() is not got


def test_logits_and_label_map_are_the_argmax_of_the_cosine_scores(clip):
    kind, oc, path, overrides = clip
    predictor = Predictor(denseclip.load_config(PRESETS[kind], overrides), path,
                          precision="fp32")
    image = random_image(64, 64, seed=4)
    tensor = predictor.prepare(image).tensor[None]
    assert tensor.shape[-2:] == (64, 64)  # the pipeline's input is the image itself
    dense = F.normalize(_reference_dense(kind, oc, tensor), dim=1)
    text = _reference_classes(oc, ["sky", "grass", "television receiver"])
    cosine = torch.einsum("bdhw,kd->bkhw", dense, text)
    logits = F.interpolate(LOGIT_SCALE * cosine, size=(64, 64), mode="bilinear",
                           align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(predictor.model(tensor), logits, atol=1e-3, rtol=1e-5)
    result = predictor.predict(image)
    assert result.class_names == ["sky", "grass", "tv"]
    top2 = logits[0].topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-3  # pixels whose argmax rounding cannot flip
    assert clear.float().mean() > 0.9
    expected = logits[0].argmax(dim=0)
    assert np.array_equal(result.labels[clear.numpy()], expected[clear].numpy())
    np.testing.assert_allclose(result.probs, logits[0].softmax(dim=0).numpy(), atol=1e-4)


def test_typed_classes_are_scored_with_their_own_ensemble(clip):
    kind, oc, path, overrides = clip
    predictor = Predictor(denseclip.load_config(PRESETS[kind], overrides), path,
                          classes="cat, dog", precision="fp32")
    image = random_image(64, 64, seed=5)
    tensor = predictor.prepare(image).tensor[None]
    dense = F.normalize(_reference_dense(kind, oc, tensor), dim=1)
    cosine = torch.einsum("bdhw,kd->bkhw", dense, _reference_classes(oc, ["cat", "dog"]))
    expected = F.interpolate(cosine, size=(64, 64), mode="bilinear", align_corners=False)[0]
    result = predictor.predict(image)
    assert result.open_class_names == ["cat", "dog"] and result.class_names[0] == "sky"
    np.testing.assert_allclose(result.open_scores, expected.numpy(), atol=1e-4)
    assert predictor.open_text_embeddings().shape == (1, 2, 32)
    predictor.clear_cache()
    with pytest.raises(PredictionError, match="does not fit the text context"):
        predictor.set_classes(["word " * 80])
    with pytest.raises(PredictionError, match="duplicate"):
        predictor.set_classes("cat, cat")


# ----------------------------------------------------------------------- commands


def test_predict_command_writes_its_outputs(rn50, tmp_path, capsys):
    kind, _, path, overrides = rn50
    image = tmp_path / "photo.png"
    Image.fromarray(random_image(64, 80, seed=6)).save(image)
    out = tmp_path / "out"
    status = main(["predict", PRESETS[kind], str(path), str(image), "--out", str(out),
                   "--classes", "cat,dog", "--precision", "fp32", *overrides])
    assert status == 0, capsys.readouterr().err
    written = {p.name for p in out.iterdir()}
    assert {"classes.json", "photo_labels.png", "photo_open_labels.png"} <= written
    names = json.loads((out / "classes.json").read_text())
    assert names["classes"] == ["sky", "grass", "tv"] and names["open_classes"] == ["cat", "dog"]
    assert np.asarray(Image.open(out / "photo_labels.png")).shape[:2] == (64, 80)


def test_test_command_evaluates_on_an_ade20k_layout(rn50, tmp_path, capsys):
    kind, _, path, overrides = rn50
    root = make_synthetic_dataset(tmp_path / "data", num_train=0, num_val=2, size=(64, 80),
                                  seed=0)
    data = [f"data.root={root}", f"model.classes={root}/classes.txt"]
    status = main(["test", PRESETS[kind], str(path), *overrides, *data, "--device", "cpu",
                   "--no-progress", "--out-dir", str(tmp_path / "eval")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert set(summary) == {"mIoU", "mAcc", "aAcc"}
    assert all(0.0 <= v <= 100.0 for v in summary.values())
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_training_is_a_clear_error(clip):
    kind, _, path, overrides = clip
    model, _ = _build(kind, overrides, path)
    with pytest.raises(NotTrainableError, match="nothing to train"):
        model.train()
    with pytest.raises(NotTrainableError, match="nothing to train"):
        model(_images(1), torch.zeros(1, 64, 64, dtype=torch.long))
    model.eval()  # fine: the model is always in eval mode
    assert model(_images(1)).shape == (1, 3, 64, 64)


def test_train_command_is_a_clear_error(rn50, tmp_path, capsys):
    kind, _, _, overrides = rn50
    root = make_synthetic_dataset(tmp_path / "data", num_train=2, num_val=0, size=(64, 80),
                                  seed=0)
    status = main(["train", PRESETS[kind], "--work-dir", str(tmp_path / "work"),
                   "--no-progress", "--device", "cpu", *overrides, f"data.root={root}",
                   f"model.classes={root}/classes.txt", "data.batch_size=1",
                   "schedule.eval_interval=0"])
    assert status == 1
    err = capsys.readouterr().err
    assert "nothing to train" in err and "denseclip test" in err
    assert not (tmp_path / "work" / "metrics.jsonl").exists()  # refused before any logging


def test_export_refuses_a_zeroshot_preset_clearly(rn50, tmp_path, capsys):
    kind, _, path, overrides = rn50
    status = main(["export", PRESETS[kind], str(path), *overrides, "--out",
                   str(tmp_path / "m.onnx")])
    assert status == 2
    assert "is a zero-shot preset" in capsys.readouterr().err


def test_zeroshot_config_errors_name_the_key():
    with pytest.raises(denseclip.ConfigError, match="model.zeroshot .*model.task: segmentation"):
        denseclip.build_model(denseclip.load_config("clip_zeroshot_rn50",
                                                    ["model.task=retinanet"]))
    with pytest.raises(denseclip.ConfigError, match="model.backbone.type resnet or vit"):
        denseclip.build_model(denseclip.load_config(
            "clip_zeroshot_rn50", ["model.backbone.type=timm", "model.backbone.name=x"]))
    with pytest.raises(denseclip.ConfigError, match="model.text.context_length"):
        denseclip.build_model(denseclip.load_config(
            "clip_zeroshot_rn50", [*SIZES["rn50"], *TEXT, "model.text.context_length=8"]))
