"""Presets, ``_base_`` inheritance, dotted overrides, validation and YAML round trips."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import pytest

import denseclip
from denseclip import Config, ConfigError, load_config
from denseclip.config import CLIP_MEAN, CLIP_STD, _coerce, config_from_dict, save_config

VIT = "denseclip_fpn_vit-b_640x640_80k"
RN50 = "denseclip_fpn_res50_512x512_80k"


@pytest.mark.parametrize("name", denseclip.available_presets())
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.name == name
    assert cfg.model.task in ("segmentation", "retinanet", "mask_rcnn")


def test_presets_exclude_base_files():
    presets = denseclip.available_presets()
    assert presets == sorted(presets)
    assert not any(p.startswith("_") for p in presets)
    assert {"tiny_denseclip_res", "tiny_clip_res", "tiny_denseclip_vit", "tiny_clip_vit"} <= set(
        presets
    )


def test_base_inheritance():
    vit = load_config(VIT)
    assert vit.model.backbone.type == "vit"
    assert vit.model.guidance.score_level == 2  # from _vitb16.yaml
    assert vit.data.crop_size == [640, 640]
    assert vit.evaluation.stride == [426, 426]
    assert vit.model.backbone.drop_path_rate == 0.1  # the preset's own value
    # values two levels up (_ade20k_fpn.yaml), merged rather than replaced
    assert vit.optim.lr == 1e-4
    assert vit.model.text.context_length == 13
    assert vit.model.guidance.aux_loss_weight == 0.4
    assert vit.data.ratio_range == [0.5, 2.0]

    rn50 = load_config(RN50)
    assert rn50.model.guidance.score_level == 3
    assert rn50.data.crop_size == [512, 512]
    assert rn50.model.backbone.layers == [3, 4, 6, 3]
    assert rn50.model.backbone.embed_dim == 1024

    baseline = load_config("fpn_clipvit-b_640x640_80k")
    assert baseline.model.guidance.enabled is False
    assert baseline.model.backbone.embeddings is False
    assert baseline.model.backbone.drop_path_rate == 0.0
    assert baseline.model.backbone.cls_embed_once is False  # kept from the base (official)


def test_overrides():
    cfg = load_config(RN50, ["optim.lr=2e-4", "data.crop_size=[256,256]",
                             "model.guidance.enabled=false", "optim.grad_clip=0.1",
                             "schedule.max_iters=100", "name=mine"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.crop_size == [256, 256]
    assert cfg.model.guidance.enabled is False
    assert cfg.optim.grad_clip == 0.1
    assert cfg.schedule.max_iters == 100
    assert cfg.name == "mine"
    # untouched neighbours survive a nested override
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.model.guidance.score_level == 3


def test_override_value_coercion():
    cfg = load_config(RN50, ["optim.lr=1e-3", "optim.weight_decay=0", "optim.grad_clip=null"])
    assert cfg.optim.lr == 1e-3  # YAML reads "1e-3" as a string; it is still a float
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.grad_clip is None


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("optim.lr=abc", r"optim\.lr: expected float, got 'abc'"),
        ("data.crop_size=512", r"data\.crop_size: expected a list"),
        ("data.crop_size=[256,abc]", r"data\.crop_size\[1\]: expected int"),
        ("schedule.max_iters=1.5", r"schedule\.max_iters: expected int"),
        ("model.guidance.enabled=3", r"model\.guidance\.enabled: expected bool"),
        ("model.backbone=resnet", r"model\.backbone: expected a mapping"),
    ],
)
def test_override_type_errors(override, phrase):
    with pytest.raises(ConfigError, match=phrase):
        load_config(RN50, [override])


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(RN50, ["optim.learning_rate=1e-3"])
    message = str(info.value)
    assert "learning_rate" in message
    assert "valid keys: lr, weight_decay" in message

    with pytest.raises(ConfigError, match="valid keys: name, model, data, optim"):
        load_config(RN50, ["optimizer.lr=1e-3"])


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(RN50, ["optim.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(RN50, ["optim.lr.value=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RN50, ["data.crop_size=[1,"])


def test_save_and_load_round_trip(tmp_path):
    for name, overrides in [(VIT, []), ("tiny_clip_res", ["optim.grad_clip=0.5",
                                                          "data.crop_size=[96,128]"])]:
        cfg = load_config(name, overrides)
        path = tmp_path / f"{name}.yaml"
        save_config(cfg, path)
        again = load_config(path)
        assert again == cfg
        assert again.to_dict() == cfg.to_dict()
        assert config_from_dict(cfg.to_dict()) == cfg
    # overrides apply to files as to presets
    assert load_config(path, ["optim.lr=3e-4"]).optim.lr == 3e-4


def test_yaml_file_with_base(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.5, weight_decay: 0.25}\nseed: 3\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\noptim: {lr: 0.125}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.name == "child"  # from the file name
    assert cfg.optim.lr == 0.125 and cfg.optim.weight_decay == 0.25 and cfg.seed == 3
    assert cfg.model == Config().model  # sections not mentioned keep their defaults


def test_a_users_file_extends_a_preset_by_name(tmp_path):
    (tmp_path / "mine.yaml").write_text("_base_: tiny_denseclip_res\noptim: {lr: 3.0e-4}\n")
    (tmp_path / "mine2.yaml").write_text("_base_: tiny_denseclip_res.yaml\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.optim.lr == 3e-4
    assert cfg.model == load_config("tiny_denseclip_res").model == \
        load_config(tmp_path / "mine2.yaml").model


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="_base_ 'nowhere.yaml' is neither a file .* nor a "
                                          "preset"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("optim: {lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "typo.yaml").write_text("optim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*unknown key\(s\) lrr"):
        load_config(tmp_path / "typo.yaml")


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown preset 'denseclip_rn50'.*available presets: "):
        load_config("denseclip_rn50")
    assert issubclass(ConfigError, ValueError)


# Every choice field of Config, by dotted key, with its allowed values (in order).
CHOICES = {
    "model.task": ("segmentation", "retinanet", "mask_rcnn"),
    "model.loss_average": ("all", "valid"),
    "model.backbone.pos_embed": ("interpolate", "crop"),
    "model.backbone.drop_path_mode": ("token", "sample"),
    "model.backbone.act": ("quick_gelu", "gelu"),
    "model.text.act": ("quick_gelu", "gelu"),
    "model.guidance.prompting": ("post", "pre"),
    "data.dataset": ("ade20k", "folder", "coco", "cityscapes", "voc"),
    "schedule.policy": ("poly", "step"),
    "evaluation.mode": ("slide", "whole"),
    "amp": ("none", "bf16", "fp16"),
    "precision": ("fp32", "bf16", "fp16", "auto", "int8"),
    "kernels": ("fast", "reference"),
    "nonfinite_loss": ("stop", "skip"),
    "log.wandb_mode": ("auto", "online", "offline"),
}


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _annotations(cls, prefix=""):
    """Dotted key -> resolved annotation of every field of ``cls``, nested sections walked."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_annotations(tp, f"{key}."))
        else:
            out[key] = tp
    return out


def test_choice_fields_are_literals():
    annotations = _annotations(Config)
    names = {key.rsplit(".", 1)[-1] for key in CHOICES}
    for key, tp in annotations.items():
        if key.rsplit(".", 1)[-1] in names:
            assert typing.get_origin(tp) is Literal, f"{key} is annotated {tp}, not a Literal"
    literals = {k: typing.get_args(tp) for k, tp in annotations.items()
                if typing.get_origin(tp) is Literal}
    assert literals == CHOICES
    # every default is one of its own choices
    for key, allowed in CHOICES.items():
        assert _get(Config(), key) in allowed


@pytest.mark.parametrize("key", CHOICES)
@pytest.mark.parametrize("bad", ["bogus", "1", "true", "[post]"])
def test_choice_field_rejects_a_bad_value(key, bad):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_denseclip_res", [f"{key}={bad}"])
    message = str(info.value)
    value = {"bogus": "'bogus'", "1": "1", "true": "True", "[post]": "['post']"}[bad]
    assert f"{key}: {value} is not one of " in message
    for allowed in CHOICES[key]:
        assert repr(allowed) in message


@pytest.mark.parametrize(("key", "value"),
                         [(k, v) for k, allowed in CHOICES.items() for v in allowed])
def test_choice_field_accepts_every_allowed_value(key, value, tmp_path):
    cfg = load_config("tiny_denseclip_res", [f"{key}={value}"])
    assert _get(cfg, key) == value
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_choice_error_message_and_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nonfinite_loss: 'skipp' is not one of 'stop', 'skip'"):
        load_config("tiny_denseclip_res", ["nonfinite_loss=skipp"])
    (tmp_path / "amp.yaml").write_text("_base_: " + str(denseclip.config.PRESET_DIR / "_tiny.yaml")
                                       + "\namp: fp32\n")
    with pytest.raises(ConfigError, match=r"amp\.yaml: amp: 'fp32' is not one of 'none', "):
        load_config(tmp_path / "amp.yaml")
    with pytest.raises(ConfigError, match=r"schedule\.policy: 'Poly' is not one of"):
        config_from_dict({"schedule": {"policy": "Poly"}})


def test_literal_coercion_checks_the_type():
    assert _coerce(1, Literal[1, 2], "x") == 1
    with pytest.raises(ConfigError, match=r"x: True is not one of 1, 2"):
        _coerce(True, Literal[1, 2], "x")
    with pytest.raises(ConfigError, match="is not one of"):
        _coerce(1.0, Literal[1, 2], "x")
    with pytest.raises(ConfigError, match="is not one of"):
        _coerce(1, Literal[True], "x")
    assert _coerce(None, Literal["a"] | None, "x") is None
    assert _coerce("a", Literal["a"] | None, "x") == "a"


def test_clip_normalisation_defaults():
    data = Config().data
    assert data.mean == list(CLIP_MEAN) and data.std == list(CLIP_STD)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------- value ranges
def numeric_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """(dotted key, field) of every int/float field (lists and optionals included)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is dict:  # optim.custom_keys
            tp = typing.get_args(tp)[1]
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        args = set(typing.get_args(tp)) | {tp}
        if args & {int, float, list[int], list[float]}:
            yield f"{prefix}{f.name}", f


def test_every_numeric_field_declares_its_range():
    undeclared = [key for key, f in numeric_fields() if "bounds" not in f.metadata]
    assert undeclared == []
    assert len(list(numeric_fields())) > 60


def test_defaults_are_within_their_ranges():
    config_from_dict({})  # raises if a default were out of its own range


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("schedule.checkpoint_interval=0", "schedule.checkpoint_interval=0: must be >= 1"),
    ("schedule.log_interval=0", "schedule.log_interval=0: must be >= 1"),
    ("schedule.max_iters=-5", "schedule.max_iters=-5: must be >= 1"),
    ("data.scale=[0,0]", "data.scale=[0, 0]: each item must be >= 1"),
    ("data.scale=[512]", "data.scale=[512]: must have 2 items"),
    ("data.crop_size=[0,64]", "data.crop_size=[0, 64]: each item must be >= 1"),
    ("data.ratio_range=[2.0,0.5]", "data.ratio_range=[2.0, 0.5]: must be in ascending order"),
    ("data.ratio_range=[0,2]", "data.ratio_range=[0.0, 2.0]: each item must be > 0"),
    ("data.flip_prob=1.5", "data.flip_prob=1.5: must be in [0, 1]"),
    ("data.std=[0.2,0,0.2]", "data.std=[0.2, 0.0, 0.2]: each item must be in (0, 1]"),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("optim.lr=.nan", "optim.lr=.nan: must be finite"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0]: each item must be in [0, 1)"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0: must be > 0"),
    ("optim.accumulate=0", "optim.accumulate=0: must be >= 1"),
    ("optim.custom_keys={backbone: {lr_mult: -0.1}}",
     "optim.custom_keys.backbone.lr_mult=-0.1: must be >= 0"),
    ("model.head_dropout=1", "model.head_dropout=1.0: must be in [0, 1)"),
    ("model.guidance.tau=0", "model.guidance.tau=0.0: must be > 0"),
    ("model.guidance.score_level=4", "model.guidance.score_level=4: must be in [0, 3]"),
    ("model.detection.score_thresh=2", "model.detection.score_thresh=2.0: must be in [0, 1]"),
    ("evaluation.stride=[0,0]", "evaluation.stride=[0, 0]: each item must be >= 1"),
    ("evaluation.aug_ratios=[]", "evaluation.aug_ratios=[]: must not be empty"),
    ("schedule.warmup_ratio=2", "schedule.warmup_ratio=2.0: must be in [0, 1]"),
    ("seed=-1", "seed=-1: must be in [0, 4294967295]"),
])
def test_out_of_range_override_names_key_value_range_and_source(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_denseclip_res", [override])
    text = str(err.value)
    assert text.startswith(f"override {override} (on ") and "tiny_denseclip_res.yaml" in text
    assert text.endswith(message) and "\n" not in text
    assert err.value.key == message.split("=")[0]


@pytest.mark.parametrize("override", ["schedule.eval_interval=0", "schedule.warmup_iters=0",
                                      "schedule.max_epochs=0", "data.num_workers=0",
                                      "optim.grad_clip=null", "data.flip_prob=0",
                                      "data.ratio_range=[1,1]", "model.guidance.decoder_layers=0"])
def test_documented_zero_and_edge_values_stay_allowed(override):
    load_config("tiny_denseclip_res", [override])


def test_out_of_range_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: tiny_denseclip_res\ndata:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: data\.batch_size=0: must be >= 1$"):
        load_config(path, ["data.crop_size=[32,32]"])  # an unrelated override is not blamed
    with pytest.raises(ConfigError, match=r"^saved: schedule\.log_interval=0: must be >= 1$"):
        config_from_dict({"schedule": {"log_interval": 0}}, "saved")


def test_type_error_in_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"^override amp=fp64 \(on .*\): amp: 'fp64' is not"):
        load_config("tiny_denseclip_res", ["amp=fp64"])


def test_cli_reports_an_out_of_range_override_in_one_line(capsys):
    from denseclip.cli import main

    assert main(["flops", "tiny_clip_res", "data.batch_size=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("data.batch_size=0: must be >= 1") and "override" in err
    assert "\n" not in err and "Traceback" not in err


def test_max_image_pixels_is_none_or_positive():
    assert denseclip.load_config("tiny_denseclip_res").data.max_image_pixels is None
    assert denseclip.load_config("tiny_denseclip_res",
                                 ["data.max_image_pixels=1000"]).data.max_image_pixels == 1000
    with pytest.raises(ConfigError, match=r"data.max_image_pixels=0: must be >= 1"):
        denseclip.load_config("tiny_denseclip_res", ["data.max_image_pixels=0"])
