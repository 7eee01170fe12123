"""Text guidance: score maps, gamma, the identity loss, tokenisation limits, init rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from denseclip.classes import load_class_names
from denseclip.models import CLIPTextEncoder, ContextDecoder, TextGuidance, tokenize
from denseclip.models.losses import cross_entropy

D = 16
NAMES = ["wall", "sky", "floor", "traffic light"]


def make_guidance(names=NAMES, prompting: str = "post", **kwargs) -> TextGuidance:
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(context_length=13, width=32, layers=2, heads=2, embed_dim=D)
    return TextGuidance(encoder, names, embed_dim=D, n_ctx=8, prompting=prompting,
                        decoder_width=32, decoder_heads=2, decoder_layers=2, **kwargs)


def embeddings(b: int = 2, h: int = 3, w: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g), torch.randn(b, D, h, w, generator=g)


def test_score_map_is_the_cosine_similarity_of_pixels_and_refined_text():
    guidance = make_guidance().eval()
    with torch.no_grad():
        guidance.gamma.fill_(0.5)  # make the decoder's contribution visible
    global_embed, dense_embed = embeddings()
    with torch.no_grad():
        out = guidance(global_embed, dense_embed)
        # Text: class names behind the contexts, refined against [global; pixels].
        text = guidance.text_encoder(guidance.tokens, guidance.contexts)[0]  # (K, D)
        visual = torch.cat([global_embed[:, None], dense_embed.flatten(2).transpose(1, 2)], 1)
        text = text[None].expand(2, -1, -1)
        text = text + 0.5 * guidance.context_decoder(text, visual)
    assert out.text.shape == (2, len(NAMES), D)
    torch.testing.assert_close(out.text, text)

    expected = torch.empty(2, len(NAMES), 3, 5)
    for b in range(2):
        for k in range(len(NAMES)):
            expected[b, k] = F.cosine_similarity(dense_embed[b], text[b, k][:, None, None], dim=0)
    assert out.score.shape == (2, len(NAMES), 3, 5)
    torch.testing.assert_close(out.score, expected, atol=1e-5, rtol=1e-5)
    assert out.score.abs().max() <= 1 + 1e-6  # no temperature


def test_score_map_matches_normalise_and_einsum():
    guidance = make_guidance().eval()
    global_embed, dense_embed = embeddings(seed=3)
    with torch.no_grad():
        out = guidance(global_embed, dense_embed)
    z = dense_embed / dense_embed.norm(dim=1, keepdim=True)
    t = out.text / out.text.norm(dim=2, keepdim=True)
    torch.testing.assert_close(out.score, torch.einsum("bchw,bkc->bkhw", z, t))


def test_gamma_starts_at_1e_4_per_channel():
    guidance = make_guidance()
    assert guidance.gamma.shape == (D,)
    assert torch.equal(guidance.gamma.detach(), torch.full((D,), 1e-4))
    assert make_guidance(gamma_init=0.3).gamma.detach().eq(0.3).all()


def test_text_encoder_stays_trainable_as_officially_and_contexts_train():
    # The official model keeps requires_grad=True on the text encoder (its lr multiplier
    # is 0); optim.freeze_text_encoder freezes it in the trainer.
    guidance = make_guidance()
    assert all(p.requires_grad for p in guidance.text_encoder.parameters())
    assert guidance.contexts.requires_grad and guidance.gamma.requires_grad
    assert guidance.contexts.shape == (1, 8, 32)
    # truncated normal, std 1, cut at +-2
    assert guidance.contexts.abs().max() <= 2.0
    assert guidance.contexts.abs().max() > 1.0


def test_post_model_text_does_not_depend_on_the_image_before_the_decoder():
    guidance = make_guidance().eval()
    with torch.no_grad():
        guidance.gamma.zero_()
        a = guidance(*embeddings(seed=0)).text
        b = guidance(*embeddings(seed=1)).text
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], guidance.text_embeddings()[0].detach())


def test_pre_model_prompting_conditions_the_text_on_the_image():
    guidance = make_guidance(prompting="pre").eval()
    assert not hasattr(guidance, "gamma")
    assert guidance.prompt_generator.queries.shape == (1, 8, 32)
    global_embed, dense_embed = embeddings()
    with torch.no_grad():
        out = guidance(global_embed, dense_embed)
        visual = torch.cat([global_embed[:, None], dense_embed.flatten(2).transpose(1, 2)], 1)
        text = guidance.text_encoder(guidance.tokens, guidance.prompt_generator(visual))
    assert out.text.shape == (2, len(NAMES), D)
    torch.testing.assert_close(out.text, text)
    assert not torch.allclose(out.text[0], out.text[1])


def test_context_decoder_initialisation():
    torch.manual_seed(0)
    decoder = ContextDecoder(512, width=256, heads=4, layers=3)
    linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert linears and norms
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.001
    for m in linears:
        if m.bias is not None:
            assert torch.equal(m.bias.detach(), torch.zeros_like(m.bias))
    for m in norms:
        assert m.weight.detach().eq(1).all() and m.bias.detach().eq(0).all()
    # q/k/v without bias, output projection with bias (DESIGN §4)
    attn = decoder.decoder[0].self_attn
    assert attn.q_proj.bias is None and attn.k_proj.bias is None and attn.v_proj.bias is None
    assert attn.proj.bias is not None
    assert len(decoder.decoder) == 3


# ------------------------------------------------------------------------ identity loss


def test_identity_loss_is_cross_entropy_on_score_over_tau():
    guidance = make_guidance()
    g = torch.Generator().manual_seed(0)
    score = torch.rand(2, len(NAMES), 4, 6, generator=g) * 2 - 1
    target = torch.randint(0, len(NAMES), (2, 16, 24), generator=g)
    expected = F.cross_entropy(
        F.interpolate(score / 0.07, size=(16, 24), mode="bilinear", align_corners=False),
        target,
    )
    for average in ("all", "valid"):
        got = guidance.identity_loss(score, target, average=average)
        torch.testing.assert_close(got, expected)


def test_loss_average_all_counts_ignored_pixels():
    guidance = make_guidance()
    g = torch.Generator().manual_seed(1)
    score = torch.randn(2, len(NAMES), 4, 4, generator=g)
    target = torch.randint(0, len(NAMES), (2, 16, 16), generator=g)
    target[0, :6] = 255
    target[1, :, :3] = 255
    valid = (target != 255).sum().item()
    loss_all = guidance.identity_loss(score, target, 255, "all")
    loss_valid = guidance.identity_loss(score, target, 255, "valid")
    assert valid < target.numel()
    torch.testing.assert_close(loss_all / loss_valid, torch.tensor(valid / target.numel()))
    # "valid" is PyTorch's own ignore_index mean
    logits = F.interpolate(score / 0.07, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss_valid, F.cross_entropy(logits, target, ignore_index=255))


def test_cross_entropy_edge_cases():
    logits = torch.randn(1, 3, 2, 2)
    everything_ignored = torch.full((1, 2, 2), 255)
    assert cross_entropy(logits, everything_ignored, average="valid").item() == 0.0
    assert cross_entropy(logits, everything_ignored, average="all").item() == 0.0
    with pytest.raises(ValueError, match="'all' or 'valid'"):
        cross_entropy(logits, everything_ignored, average="mean")


# ------------------------------------------------------------------------- tokenisation


def test_long_class_name_is_rejected_with_name_and_limit():
    with pytest.raises(ValueError, match="a very long class name indeed") as info:
        tokenize(["sky", "a very long class name indeed"], 5)
    assert "at most 3" in str(info.value)


def test_guidance_rejects_class_names_that_do_not_fit():
    with pytest.raises(ValueError, match="'a very long class name indeed'.*at most 3"):
        make_guidance(["sky", "a very long class name indeed"])


def test_all_ade20k_names_fit_the_official_five_positions():
    names = load_class_names("ade20k")
    assert len(names) == 150
    tokens = tokenize(names, 5)
    assert tokens.shape == (150, 5)
    sot, eot = tokens[0, 0].item(), tokens.max().item()
    assert (tokens[:, 0] == sot).all()
    assert (tokens.argmax(dim=1) >= 2).all()  # EOT follows at least one name token
    assert ((tokens == eot).sum(dim=1) == 1).all()


def test_tokens_layout_sot_name_eot_padding():
    tokens = tokenize(["sky", "traffic light"], 6)
    full = tokenize(["sky", "traffic light"], 77)
    assert torch.equal(tokens, full[:, :6])
    assert tokens[0, 3:].eq(0).all()  # SOT, sky, EOT, then padding
    assert tokens[0, 2] == tokens.max()


def test_empty_class_list_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        tokenize([], 5)
    with pytest.raises(ValueError, match="empty"):
        make_guidance([])


def test_set_classes_changes_the_number_of_score_maps():
    guidance = make_guidance().eval()
    guidance.set_classes(["cat", "dog"])
    assert guidance.num_classes == 2 and guidance.class_names == ["cat", "dog"]
    with torch.no_grad():
        out = guidance(*embeddings())
    assert out.score.shape == (2, 2, 3, 5)


def test_guidance_checks_its_arguments():
    encoder = CLIPTextEncoder(context_length=13, width=32, layers=1, heads=2, embed_dim=D)
    with pytest.raises(ValueError, match="prompting must be"):
        TextGuidance(encoder, NAMES, embed_dim=D, prompting="mid")
    with pytest.raises(ValueError, match="text embedding dim 16 != visual embedding dim 8"):
        TextGuidance(encoder, NAMES, embed_dim=8)


def test_embed_is_the_text_encoder_behind_the_contexts_and_cached_per_list():
    guidance = make_guidance().eval()
    calls = []
    guidance.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    texts = ["cat", "green grass"]
    first = guidance.embed(texts)
    assert first.shape == (1, 2, D) and not first.requires_grad
    with torch.no_grad():
        expected = guidance.text_encoder(tokenize(texts, 13 - 8), guidance.contexts)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    assert guidance.embed(list(texts)) is first and len(calls) == 2  # cached
    assert guidance.embed(["dog"]).shape == (1, 1, D) and len(calls) == 3
    guidance.embed(texts)
    assert len(calls) == 4  # the last list only is kept
    with torch.no_grad():
        guidance.contexts.add_(0.5)  # an in-place update, as an optimiser step
    changed = guidance.embed(texts)
    assert len(calls) == 5 and not torch.equal(changed, first)
    guidance.clear_cache()
    assert guidance.embed(texts) is not changed and len(calls) == 6


def test_open_texts_are_tokenised_for_the_text_context():
    guidance = make_guidance()
    assert guidance.text_length == 13 - 8
    assert torch.equal(guidance.tokenize(["cat", "dog"]), tokenize(["cat", "dog"], 5))
    with pytest.raises(ValueError, match=r"'a remarkably verbose description'.*at most 3"):
        guidance.tokenize(["a remarkably verbose description"])
    with pytest.raises(ValueError, match="pre-model prompting"):
        make_guidance(prompting="pre").embed(["cat"])
