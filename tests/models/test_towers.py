"""The CLIP towers against open_clip (random weights), and position-embedding handling."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

import denseclip
from denseclip.models import CLIPResNet, CLIPTextEncoder, CLIPViT, tokenize
from denseclip.models.layers import resize_grid, spatial_pos_embed
from tests.helpers.weights import randomise_batchnorm

ATOL = 1e-5
TEXTS = ["a diagram", "A CAT, sitting!", "  traffic light "]
MORE_TEXTS = TEXTS + ["bed ", "Pool Table", "it's 2 o'clock", "crème brûlée", ""]


def _open_clip_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # OpenAI CLIP uses QuickGELU; open_clip's plain configs would use nn.GELU.
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
    return model.eval()


def _visual_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k[len("visual."):]: v for k, v in model.state_dict().items()
            if k.startswith("visual.")}


def _text_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


@pytest.fixture(scope="module")
def oc_rn50():
    model = _open_clip_model("RN50")
    randomise_batchnorm(model.visual, seed=1)
    return model


@pytest.fixture(scope="module")
def oc_vit():
    return _open_clip_model("ViT-B-16")


@pytest.fixture(scope="module")
def image224():
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def oc_vit_embedding(oc_vit, image224):
    with torch.no_grad():
        return oc_vit.encode_image(image224)


@pytest.fixture(scope="module")
def ours_vit(oc_vit):
    vit = CLIPViT(input_resolution=224, class_embedding_quirk=False, embeddings=True).eval()
    result = vit.load_state_dict(_visual_state(oc_vit), strict=False)
    return vit, result


# --------------------------------------------------------------------------- parity


def test_rn50_global_embedding_matches_open_clip(oc_rn50, image224):
    ours = CLIPResNet(layers=[3, 4, 6, 3], width=64, heads=32, embed_dim=1024,
                      input_resolution=224).eval()
    ours.load_state_dict(_visual_state(oc_rn50), strict=True)  # same key names exactly
    with torch.no_grad():
        expected = oc_rn50.encode_image(image224)
        features, (global_embed, dense_embed) = ours(image224)
    assert expected.abs().max() > 0.1  # not a degenerate comparison
    assert global_embed.shape == (1, 1024)
    assert (global_embed - expected).abs().max().item() <= ATOL
    assert dense_embed.shape == (1, 1024, 7, 7)
    assert [tuple(f.shape[1:]) for f in features] == [
        (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)
    ]
    assert ours.out_channels == [256, 512, 1024, 2048]


def test_vit_b16_loads_open_clip_keys_except_pyramid(ours_vit):
    _, result = ours_vit
    assert result.unexpected_keys == []
    assert result.missing_keys, "the pyramid modules have no open_clip counterpart"
    assert all(k.startswith(("fpn1.", "fpn2.", "fpn3.", "fpn4.")) for k in result.missing_keys)


def test_vit_b16_global_embedding_matches_open_clip(oc_vit_embedding, ours_vit, image224):
    vit, _ = ours_vit
    with torch.no_grad():
        features, (global_embed, dense_embed) = vit(image224)
    expected = oc_vit_embedding
    assert expected.abs().max() > 0.1
    assert global_embed.shape == (1, 512)
    assert (global_embed - expected).abs().max().item() <= ATOL
    assert dense_embed.shape == (1, 512, 14, 14)
    assert [tuple(f.shape[1:]) for f in features] == [
        (768, 56, 56), (768, 28, 28), (768, 14, 14), (768, 7, 7)
    ]


def test_vit_class_embedding_quirk_changes_the_embedding(oc_vit_embedding, ours_vit,
                                                         image224):
    """The official code adds the class embedding twice; with the quirk on, the tower is
    no longer open_clip's (documents DESIGN §9)."""
    vit, _ = ours_vit
    vit.class_embedding_quirk = True
    try:
        with torch.no_grad():
            got = vit.encode_image(image224)
    finally:
        vit.class_embedding_quirk = False
    assert (got - oc_vit_embedding).abs().max().item() > 1e-3


def test_tokenize_matches_open_clip():
    ours = tokenize(MORE_TEXTS, 77)
    assert ours.dtype == torch.long
    assert torch.equal(ours, open_clip.tokenize(MORE_TEXTS))


def test_text_encoder_matches_open_clip(oc_rn50):
    encoder = CLIPTextEncoder(context_length=77, embed_dim=1024).eval()
    encoder.load_state_dict(_text_state(oc_rn50), strict=True)
    with torch.no_grad():
        expected = oc_rn50.encode_text(open_clip.tokenize(TEXTS))
        ours = encoder(tokenize(TEXTS, 77))
    assert ours.shape == (len(TEXTS), 1024)
    assert expected.abs().max() > 0.1
    assert (ours - expected).abs().max().item() <= ATOL


def test_text_contexts_are_inserted_after_sot():
    """Contexts equal to the embeddings of real words give the same feature as writing
    those words into the text: checks the order [SOT, contexts, name, EOT] and the EOT
    shift."""
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(context_length=20, width=32, layers=2, heads=2,
                              embed_dim=16).eval()
    prefix = tokenize(["a photo of"], 20)[0]
    prefix_ids = prefix[1:prefix.argmax()]  # BPE ids between SOT and EOT
    n_ctx = len(prefix_ids)
    names = ["dog", "traffic light"]
    contexts = encoder.token_embedding(prefix_ids)[None]  # (1, n_ctx, width)
    with torch.no_grad():
        with_contexts = encoder(tokenize(names, 20 - n_ctx), contexts)
        written = encoder(tokenize([f"a photo of {n}" for n in names], 20))
    assert with_contexts.shape == (1, 2, 16)
    torch.testing.assert_close(with_contexts[0], written, atol=1e-5, rtol=1e-5)

    batch = torch.stack([contexts[0], torch.randn_like(contexts[0])])
    with torch.no_grad():
        out = encoder(tokenize(names, 20 - n_ctx), batch)
    assert out.shape == (2, 2, 16)
    torch.testing.assert_close(out[0], written, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[1], written)


def test_text_encoder_rejects_sequences_longer_than_its_context():
    encoder = CLIPTextEncoder(context_length=13, width=32, layers=1, heads=2, embed_dim=16)
    with pytest.raises(ValueError, match="context length 13"):
        encoder(tokenize(["dog"], 6), torch.zeros(1, 8, 32))


# --------------------------------------------------------------- position embeddings


def _tiny_resnet(**kwargs) -> CLIPResNet:
    torch.manual_seed(0)
    return CLIPResNet(layers=[1, 1, 1, 1], width=8, heads=2, embed_dim=16,
                      input_resolution=64, **kwargs).eval()


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (128, 64), (70, 100)])
def test_resnet_attention_pool_follows_the_input_size(size):
    model = _tiny_resnet()
    assert model.attnpool.positional_embedding.shape == (2 * 2 + 1, 256)
    with torch.no_grad():
        features, (global_embed, dense_embed) = model(torch.randn(2, 3, *size))
    h, w = features[3].shape[-2:]
    assert (h, w) == (size[0] // 32, size[1] // 32)
    assert global_embed.shape == (2, 16)
    assert dense_embed.shape == (2, 16, h, w)
    assert torch.isfinite(dense_embed).all()


def test_position_grid_interpolation_is_bilinear():
    pos = torch.randn(4 * 4, 8)
    assert resize_grid(pos, (4, 4)) is pos  # stored size: untouched
    out = spatial_pos_embed(pos, (6, 10), "interpolate")
    grid = pos.reshape(4, 4, 8).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(6, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected[0].permute(1, 2, 0).reshape(60, 8))


def test_position_grid_crop_keeps_top_left_cells():
    pos = torch.arange(5 * 5 * 2, dtype=torch.float32).reshape(25, 2)
    out = spatial_pos_embed(pos, (2, 3), "crop")
    expected = pos.reshape(5, 5, 2)[:2, :3].reshape(6, 2)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="unknown position-embedding mode"):
        spatial_pos_embed(pos, (2, 3), "nearest")


def test_resnet_crop_mode_rejects_inputs_beyond_the_stored_grid():
    model = _tiny_resnet(pos_embed="crop")  # 2x2 grid stored
    with torch.no_grad():
        _, (_, dense) = model(torch.randn(1, 3, 64, 32))  # 2x1 grid: a crop
    assert dense.shape == (1, 16, 2, 1)
    with pytest.raises(ValueError, match=r"3x2 position grid but only 2x2 is stored"):
        with torch.no_grad():
            model(torch.randn(1, 3, 96, 64))


def test_vit_crop_mode_rejects_inputs_beyond_the_stored_grid():
    torch.manual_seed(0)
    vit = CLIPViT(width=32, layers=4, heads=2, patch_size=16, embed_dim=16,
                  input_resolution=64, out_indices=[0, 1, 2, 3], pos_embed="crop").eval()
    with torch.no_grad():
        _, (_, dense) = vit(torch.randn(1, 3, 48, 64))
        assert dense.shape == (1, 16, 3, 4)
        with pytest.raises(ValueError, match="crop mode"):
            vit(torch.randn(1, 3, 80, 64))


def test_vit_interpolates_to_non_square_inputs():
    torch.manual_seed(0)
    vit = CLIPViT(width=32, layers=4, heads=2, patch_size=16, embed_dim=16,
                  input_resolution=64, out_indices=[0, 1, 2, 3]).eval()
    with torch.no_grad():
        features, (global_embed, dense) = vit(torch.randn(2, 3, 64, 96))
    assert global_embed.shape == (2, 16)
    assert dense.shape == (2, 16, 4, 6)
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_vit_rejects_bad_out_indices():
    with pytest.raises(ValueError, match="out_indices"):
        CLIPViT(width=32, layers=4, heads=2, out_indices=[0, 1, 2, 4])


# --------------------------------------------------------------------------- OpenCLIP
@pytest.fixture(scope="module")
def oc_vit_gelu():
    """open_clip's own ViT-B/16 configuration (exact GELU), as its LAION releases use."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model("ViT-B-16", pretrained=None).eval()


def test_openclip_gelu_towers_match_open_clip(oc_vit_gelu, image224):
    vit = CLIPViT(input_resolution=224, class_embedding_quirk=False, act="gelu").eval()
    vit.load_state_dict(_visual_state(oc_vit_gelu), strict=False)
    text = CLIPTextEncoder(context_length=77, embed_dim=512, act="gelu").eval()
    text.load_state_dict(_text_state(oc_vit_gelu), strict=True)
    with torch.no_grad():
        expected_image = oc_vit_gelu.encode_image(image224)
        expected_text = oc_vit_gelu.encode_text(open_clip.tokenize(TEXTS))
        _, (image, _) = vit(image224)
        words = text(tokenize(TEXTS, 77))
        quick = CLIPViT(input_resolution=224, class_embedding_quirk=False).eval()
        quick.load_state_dict(vit.state_dict())
        _, (wrong, _) = quick(image224)
    assert (image - expected_image).abs().max().item() <= ATOL
    assert (words - expected_text).abs().max().item() <= ATOL
    assert (wrong - expected_image).abs().max().item() > 100 * ATOL  # the activation matters


def test_openclip_preset_loads_an_open_clip_state_dict(oc_vit_gelu, image224, tmp_path):
    torch.save(oc_vit_gelu.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    cfg = denseclip.load_config("denseclip_fpn_vit-b-laion2b_640x640_80k",
                                ["model.backbone.input_resolution=224"])
    model = denseclip.build_model(cfg).eval()
    report = denseclip.load_checkpoint(model, tmp_path / "open_clip_pytorch_model.bin")
    assert report.format == "openai"  # OpenCLIP keeps OpenAI's key layout
    assert "logit_scale" in report.ignored
    assert not any(k.startswith(("backbone.transformer", "guidance.text_encoder.transformer"))
                   for k in report.new)
    with torch.no_grad():
        _, (image, _) = model.backbone(image224)
        expected = oc_vit_gelu.encode_image(image224)
    assert (image - expected).abs().max().item() <= ATOL
