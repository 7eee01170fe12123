"""The ViT fix ``model.backbone.cls_embed_once`` and its old, inverse name
``class_embedding_quirk``, still read from config files, overrides and checkpoints."""

from __future__ import annotations

import pytest
import torch
import yaml

import denseclip
from denseclip.config import ConfigError, config_from_dict, load_config
from denseclip.weights import save_checkpoint
from denseclip.weights.resolver import describe

VIT = "tiny_denseclip_vit"


def vit_logits(cfg) -> torch.Tensor:
    torch.manual_seed(0)
    model = denseclip.build_model(cfg).eval()
    with torch.no_grad():
        return model(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))


def write(tmp_path, name: str, backbone: dict):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"_base_": VIT, "model": {"backbone": backbone}}))
    return path


def test_official_by_default_and_the_fix_on_request():
    official = load_config(VIT)
    assert official.model.backbone.cls_embed_once is False
    assert denseclip.build_model(official).backbone.class_embedding_quirk is True
    fixed = load_config(VIT, ["model.backbone.cls_embed_once=true"])
    assert denseclip.build_model(fixed).backbone.class_embedding_quirk is False
    assert not torch.allclose(vit_logits(official), vit_logits(fixed))


@pytest.mark.parametrize("quirk", [True, False])
def test_old_key_means_the_inverse_of_the_new_one(tmp_path, quirk):
    old = load_config(write(tmp_path, "old.yaml", {"class_embedding_quirk": quirk}))
    new = load_config(write(tmp_path, "new.yaml", {"cls_embed_once": not quirk}))
    assert old.model.backbone == new.model.backbone
    override = load_config(VIT, [f"model.backbone.class_embedding_quirk={str(quirk).lower()}"])
    assert override.model.backbone.cls_embed_once is (not quirk)
    torch.testing.assert_close(vit_logits(old), vit_logits(new), rtol=0, atol=0)
    assert "class_embedding_quirk" not in yaml.safe_dump(old.to_dict())  # saved: new name


def test_both_keys_contradicting_in_one_file_is_an_error(tmp_path):
    bad = write(tmp_path, "bad.yaml", {"class_embedding_quirk": True, "cls_embed_once": True})
    with pytest.raises(ConfigError, match="class_embedding_quirk=true contradicts "
                                          "model.backbone.cls_embed_once=true"):
        load_config(bad)
    agreeing = write(tmp_path, "ok.yaml", {"class_embedding_quirk": True, "cls_embed_once": False})
    assert load_config(agreeing).model.backbone.cls_embed_once is False
    # a later source wins over an earlier one, whatever name each uses
    fixed = write(tmp_path, "fixed.yaml", {"cls_embed_once": True})
    assert load_config(fixed, ["model.backbone.class_embedding_quirk=true"]) \
        .model.backbone.cls_embed_once is False
    with pytest.raises(ConfigError, match="expected bool"):
        load_config(write(tmp_path, "typo.yaml", {"class_embedding_quirk": "yes please"}))


def test_a_checkpoint_written_with_the_old_key_still_loads(tmp_path):
    cfg = load_config(VIT, ["model.backbone.cls_embed_once=true"])
    data = cfg.to_dict()
    backbone = data["model"]["backbone"]
    backbone["class_embedding_quirk"] = not backbone.pop("cls_embed_once")  # an older file
    assert config_from_dict(data).model.backbone.cls_embed_once is True
    model = denseclip.build_model(cfg)
    path = save_checkpoint(tmp_path / "old.pth", model, iteration=1, config=data)
    assert describe(path).config.model.backbone.cls_embed_once is True
    flipped = describe(path, ["model.backbone.cls_embed_once=false"])  # the override wins
    assert flipped.config.model.backbone.cls_embed_once is False
