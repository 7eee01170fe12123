"""ImageNet backbones under DenseCLIP: torchvision ResNet / Swin and timm ``features_only``
pyramids with a new attention pool, their weights loaded from the libraries' own state
dicts (checked against the libraries' own loading), CLIP's text tower loaded alone, the
learning-rate rules, the presets, and training through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import denseclip
from denseclip.config import ConfigError
from denseclip.data.synthetic import make_synthetic_dataset
from denseclip.engine.optim import param_groups
from denseclip.models.imagenet import ImageNetBackbone, TimmBody, TorchvisionSwin
from denseclip.tools.flops import count_parameters
from denseclip.weights import CheckpointError, load_checkpoint, load_text_weights
from tests.helpers.clip import FakeOpenAICLIP

README = Path(__file__).parents[2] / "README.md"
TINY_SWIN = dict(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                 window_size=[7, 7])
# Full-size presets → parameters excluding the text encoder (M), as built here; pinned so
# that a change to a body, the pool or the heads is noticed.
ZOO = {
    "denseclip_fpn_r50-in1k_512x512_80k": 50.229,
    "fpn_r50-in1k_512x512_80k": 31.023,
    "denseclip_fpn_r101-in1k_512x512_80k": 69.221,
    "fpn_r101-in1k_512x512_80k": 50.015,
    "denseclip_fpn_swin-t_512x512_80k": 41.171,
    "fpn_swin-t_512x512_80k": 34.422,
    "retinanet_denseclip_r50-in1k_fpn_1x_coco": 60.429,
    "retinanet_r50-in1k_fpn_1x_coco": 37.969,
    "mask_rcnn_denseclip_r50-in1k_fpn_1x_coco": 66.673,
    "mask_rcnn_r50-in1k_fpn_1x_coco": 44.396,
    "retinanet_denseclip_swin-t_fpn_1x_coco": 46.532,
    "retinanet_swin-t_fpn_1x_coco": 38.459,
    "mask_rcnn_denseclip_swin-t_fpn_1x_coco": 55.684,
    "mask_rcnn_swin-t_fpn_1x_coco": 47.795,
}
# Shrinks everything but the backbone: the full-size backbones run at small inputs.
SMALL_TEXT = ["model.text.width=32", "model.text.layers=1", "model.text.heads=2",
              "model.backbone.embed_dim=32", "model.guidance.decoder_width=32",
              "model.guidance.decoder_heads=2", "model.guidance.decoder_layers=1",
              "model.neck_channels=32", "model.head_channels=32"]


def build(name: str, *overrides: str):
    torch.manual_seed(0)
    return denseclip.build_model(denseclip.load_config(name, list(overrides)))


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------- bodies
@pytest.mark.parametrize("source,name,kwargs,channels", [
    ("torchvision", "resnet18", {}, [64, 128, 256, 512]),
    ("torchvision", "resnet50", {}, [256, 512, 1024, 2048]),
    ("torchvision", "SwinTransformer", TINY_SWIN, [16, 32, 64, 128]),
    ("timm", "resnet18", {}, [64, 128, 256, 512]),
    ("timm", "convnext_atto", {}, [40, 80, 160, 320]),
    ("timm", "efficientnet_b0", {}, [24, 40, 112, 320]),
    ("timm", "swin_tiny_patch4_window7_224", {"img_size": 96}, [96, 192, 384, 768]),
])
def test_levels_come_from_the_network(source, name, kwargs, channels):
    backbone = denseclip.build_model(denseclip.load_config(
        "tiny_denseclip_r18-in1k", [f"model.backbone.type={source}",
                                    f"model.backbone.name={name}",
                                    f"model.backbone.kwargs={json.dumps(kwargs)}",
                                    "model.backbone.heads=2"])).backbone.eval()
    assert isinstance(backbone, ImageNetBackbone)
    assert backbone.out_channels == channels == backbone.body.out_channels
    assert backbone.body.strides == [4, 8, 16, 32]
    size = (96, 96) if "swin_tiny" in name else (96, 128)  # timm's Swin takes its own size
    with torch.no_grad():
        features, (global_embed, dense) = backbone(torch.randn(2, 3, *size))
    for f, c, s in zip(features, channels, [4, 8, 16, 32], strict=True):
        assert f.shape == (2, c, size[0] // s, size[1] // s)  # NCHW, whatever the library
    assert global_embed.shape == (2, 32) and dense.shape == (2, 32, size[0] // 32, size[1] // 32)


def test_bad_backbones_are_named():
    with pytest.raises(ConfigError, match="torchvision.models has no builder 'resnet5'"):
        build("tiny_denseclip_r18-in1k", "model.backbone.name=resnet5")
    with pytest.raises(ConfigError, match="builds a VGG.*type: timm"):
        build("tiny_denseclip_r18-in1k", "model.backbone.name=vgg11")
    with pytest.raises(ConfigError, match="strides \\[16, 16, 16\\], none at 4"):
        build("tiny_denseclip_r18-in1k", "model.backbone.type=timm",
              "model.backbone.name=vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="12 heads do not divide .* 512 channels"):
        build("tiny_denseclip_r18-in1k", "model.backbone.heads=12")
    with pytest.raises(ConfigError, match="needs the model's name"):
        build("tiny_denseclip_r18-in1k", "model.backbone.name=''")


# ----------------------------------------------------------------------------- weights
def test_torchvision_resnet_weights_load_as_torchvision_loads_them(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    path = save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = build("tiny_denseclip_r18-in1k").eval()
    report = load_checkpoint(model, path)
    assert report.format == "imagenet"
    assert len(report.loaded) == len(reference.state_dict()) - 2  # all but fc
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert "ImageNet classifier's fc.weight, fc.bias" in str(report)
    assert not [k for k in report.new if k.startswith("backbone.body.")]
    assert {k.split(".")[0] for k in report.new} == {"backbone", "guidance", "neck", "head"}
    # the pyramid equals torchvision's own feature extraction of the same network
    nodes = {f"layer{i}": str(i) for i in range(1, 5)}
    extractor = create_feature_extractor(reference.eval(), return_nodes=nodes)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ours, _ = model.backbone(x)
        theirs = list(extractor(x).values())
    # Exact: our backbone runs torchvision's modules themselves (same operations, same
    # layout), so the bits agree on any one machine (checked with AVX-512 and AVX2 kernels).
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torchvision_swin_weights_load_and_new_norms_are_reported(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.SwinTransformer(**TINY_SWIN).eval()
    path = save(reference.state_dict(), tmp_path / "swin.pth")
    model = build("tiny_denseclip_swin").eval()
    report = load_checkpoint(model, path)
    assert sorted(report.ignored) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    body_new = sorted(k for k in report.new if k.startswith("backbone.body."))
    assert body_new == sorted(f"backbone.body.norms.{i}.{p}" for i in range(4)
                              for p in ("weight", "bias"))
    assert "left at initialisation" in str(report) and "backbone.body" in str(report)
    # the last stage before the norms equals torchvision's features (NHWC → NCHW)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = reference.features(x)
        stages = model.backbone.body.features(x)
    torch.testing.assert_close(stages, expected, rtol=0, atol=0)  # the same modules: exact
    assert isinstance(model.backbone.body, TorchvisionSwin)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_timm_weights_load_as_timm_loads_them(tmp_path, name):
    torch.manual_seed(1)
    full = timm.create_model(name, pretrained=False)
    path = save(full.state_dict(), tmp_path / f"{name}.pth")
    model = build("tiny_denseclip_r18-in1k", "model.backbone.type=timm",
                  f"model.backbone.name={name}", "model.backbone.heads=8").eval()
    report = load_checkpoint(model, path)
    assert report.format == "imagenet"
    assert not [k for k in report.new if k.startswith("backbone.body.")]
    assert report.ignored and all(k.startswith(("fc.", "head.")) for k in report.ignored)
    # timm's own loading of the same file into its features_only model
    reference = timm.create_model(name, pretrained=True, features_only=True,
                                  out_indices=model.backbone.body.net.feature_info.out_indices,
                                  pretrained_cfg_overlay={"file": str(path)}).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours, _ = model.backbone(x)
        theirs = reference(x)
    for a, b in zip(ours, theirs, strict=True):  # timm's own modules run: exact
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wrong_or_incomplete_imagenet_files_are_refused(tmp_path):
    model = build("tiny_denseclip_r18-in1k")
    r34 = save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match=r"file keys unknown to the model .*layer1\.2"):
        load_checkpoint(model, r34)
    sd = torchvision.models.resnet18().state_dict()
    partial = save({k: v for k, v in sd.items() if not k.startswith("layer4.")},
                   tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing from the file .*backbone\.body\.layer4"):
        load_checkpoint(model, partial)


def test_text_tower_loads_alone_from_an_openai_file(tmp_path):
    torch.manual_seed(3)
    clip = FakeOpenAICLIP(vit=False)
    path = save(clip.state_dict(), tmp_path / "RN50.pt")
    model = build("tiny_denseclip_r18-in1k")
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    report = load_text_weights(model, path)
    text = model.guidance.text_encoder
    assert sorted(report.loaded) == sorted(f"guidance.text_encoder.{k}"
                                           for k in text.state_dict())
    torch.testing.assert_close(text.token_embedding.weight, clip.token_embedding.weight)
    torch.testing.assert_close(text.text_projection, clip.text_projection)
    torch.testing.assert_close(text.positional_embedding, clip.positional_embedding[:13])
    n_visual = sum(k.startswith("visual.") for k in clip.state_dict())
    assert f"image tower ignored: {n_visual} visual.* tensors" in str(report)
    assert report.ignored == ["logit_scale"]
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k

    wide = build("tiny_denseclip_r18-in1k", "model.backbone.embed_dim=64")
    with pytest.raises(CheckpointError, match="projects to 32 .* set model.backbone.embed_dim: 32"):
        load_text_weights(wide, path)
    baseline = build("tiny_denseclip_r18-in1k", "model.guidance.enabled=false",
                     "model.backbone.embeddings=false")
    with pytest.raises(CheckpointError, match="has no text encoder"):
        load_text_weights(baseline, path)
    imagenet_file = save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="this is a state_dict checkpoint"):
        load_text_weights(model, imagenet_file)


# ----------------------------------------------------------------------------- recipe
def test_new_pool_learns_at_the_heads_rate_and_the_body_at_the_backbones():
    cfg = denseclip.load_config("denseclip_fpn_swin-t_512x512_80k", SMALL_TEXT)
    model = denseclip.build_model(cfg)
    lr = {name: g["lr"] for g in param_groups(model, cfg.optim) for name in g["names"]}
    decay = {name: g["weight_decay"] for g in param_groups(model, cfg.optim)
             for name in g["names"]}
    base = cfg.optim.lr
    pool = [n for n in lr if n.startswith("backbone.attnpool.")]
    body = [n for n in lr if n.startswith("backbone.body.")]
    assert pool and all(lr[n] == base for n in pool)
    assert body and all(lr[n] == pytest.approx(0.1 * base) for n in body)
    tables = [n for n in body if n.endswith("relative_position_bias_table")]
    assert len(tables) == 12 and all(decay[n] == 0 for n in tables)
    assert all(lr[n] == 0 for n in lr if n.startswith("guidance.text_encoder."))
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.data.std == [0.229, 0.224, 0.225]


def test_detectors_normalise_with_the_configs_statistics():
    model = build("tiny_retinanet_denseclip_r18-in1k")
    assert model.transform.image_mean == [0.485, 0.456, 0.406]
    assert model.transform.image_std == [0.229, 0.224, 0.225]
    bn = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.train()
    assert bn and not any(m.training or m.weight.requires_grad for m in bn)  # frozen BN


@pytest.mark.parametrize("name", list(ZOO))
def test_full_size_parameter_counts(name):
    with torch.device("meta"):
        model = denseclip.build_model(denseclip.load_config(name))
    assert count_parameters(model)["excluding_text_encoder"] / 1e6 == pytest.approx(
        ZOO[name], abs=0.001)


@pytest.mark.parametrize("name", [n for n in ZOO if "coco" not in n])
def test_segmentation_presets_run_forward_and_backward(shared_coco, name):
    model = build(name, *SMALL_TEXT, f"model.classes={shared_coco / 'classes.txt'}").train()
    images = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64))
    losses = model(images, target)
    assert set(losses) == ({"loss_seg", "loss_aux"} if "denseclip" in name else {"loss_seg"})
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("name", [n for n in ZOO if "coco" in n])
def test_detection_presets_run_forward_and_backward(shared_coco, name):
    from tests.models.test_detection import train_batch

    model = build(name, *SMALL_TEXT, f"model.classes={shared_coco / 'classes.txt'}",
                  "model.detection.min_size=96", "model.detection.max_size=128",
                  "model.detection.rpn_pre_nms_top_n=[100, 50]",
                  "model.detection.rpn_post_nms_top_n=[50, 50]",
                  "model.detection.box_batch_size_per_image=32").train()
    batch = train_batch(shared_coco, "mask_rcnn" in name)
    losses = model(batch["image"], batch["target"])
    assert ("loss_seg_aux" in losses) == ("denseclip" in name)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


# ----------------------------------------------------------------------------- README / CLI
def readme_timm_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- timm example -->\s*```yaml\n(.*?)```", text, re.S)
    assert match, "README lacks the timm YAML example"
    return match.group(1)


def test_readme_timm_example_builds_and_trains(tmp_path, shared_coco):
    path = tmp_path / "my_timm_denseclip.yaml"
    path.write_text(readme_timm_example())
    cfg = denseclip.load_config(path, [*SMALL_TEXT, f"model.classes={shared_coco}/classes.txt"])
    assert cfg.model.backbone.type == "timm"
    torch.manual_seed(0)
    model = denseclip.build_model(cfg).train()
    body = model.backbone.body
    assert isinstance(body, TimmBody)
    assert body.out_channels == list(body.net.feature_info.channels())
    losses = model(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))
    sum(losses.values()).backward()
    assert model.backbone.attnpool.c_proj.weight.grad is not None


def test_cli_trains_on_imagenet_and_clip_text_weights(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=2, size=(64, 80),
                                  seed=0)
    weights = save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    text = save(FakeOpenAICLIP(vit=False).state_dict(), tmp_path / "RN50.pt")
    work = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, "-m", "denseclip", "train", "tiny_denseclip_r18-in1k",
         "--load-from", str(weights), "--text-weights", str(text), "--work-dir", str(work),
         "--no-progress", f"data.root={root}", f"model.classes={root}/classes.txt",
         "schedule.max_iters=2", "schedule.eval_interval=0", "schedule.checkpoint_interval=2",
         "data.num_workers=0"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "imagenet checkpoint, 120 tensors loaded" in run.stdout
    assert "image tower ignored" in run.stdout
    assert "random initialisation" not in run.stdout + run.stderr
    saved = denseclip.weights.read_checkpoint(work / "iter_2.pth")["model"]
    # the text encoder trains at lr_mult 0 (plus the poly schedule's absolute min_lr)
    torch.testing.assert_close(saved["guidance.text_encoder.text_projection"],
                               torch.load(text)["text_projection"], rtol=0, atol=1e-4)

    plain = subprocess.run(
        [sys.executable, "-m", "denseclip", "train", "tiny_denseclip_r18-in1k",
         "--work-dir", str(tmp_path / "plain"), "--no-progress", f"data.root={root}",
         f"model.classes={root}/classes.txt", "schedule.max_iters=1",
         "schedule.eval_interval=0", "data.num_workers=0"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "text encoder is left at random initialisation" in plain.stdout + plain.stderr
