"""Each fast kernel (:mod:`denseclip.runtime`) computes the reference function: fused
attention, BatchNorm folded into the convolution, the text encoder's shared prefix; and
FLOP counting is unaffected by the caller's kernel choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import denseclip
from denseclip.classes import load_class_names
from denseclip.models import CLIPTextEncoder, tokenize
from denseclip.models.layers import attention, causal_mask, conv_bn
from denseclip.models.losses import cross_entropy
from denseclip.runtime import fast_kernels, reference_kernels
from denseclip.tools.flops import complexity

# fp32: the fused kernel and the explicit products differ only in summation order, so never
# bit for bit; the worst difference is under a tenth of this bound with the AVX-512, AVX2
# and SSE4.1 kernels (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA), O(1) for a wrong softmax.
RTOL, ATOL = 2e-6, 1e-6


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max |expected| (a norm-wise relative bound, which
    small entries of a gradient do not dominate)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x {scale:.3g}"


def _qkv(shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _both(fn, *tensors):
    """``fn(*tensors)`` with the fast and with the reference kernels."""
    assert fast_kernels()
    fast = fn(*tensors)
    with reference_kernels():
        ref = fn(*tensors)
    return fast, ref


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("shape", [(6, 7, 16), (2, 3, 7, 16)], ids=["3d", "4d"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "causal"])
def test_attention_fast_equals_reference(shape, masked):
    q, k, v = _qkv(shape)
    mask = causal_mask(shape[-2]) if masked else None
    fast, ref = _both(lambda *t: attention(*t, mask), q, k, v)
    assert fast.shape == ref.shape == shape
    torch.testing.assert_close(fast, ref, rtol=RTOL, atol=ATOL)
    if masked:  # the first query sees only the first key
        torch.testing.assert_close(fast[..., 0, :], v[..., 0, :], rtol=RTOL, atol=ATOL)


def test_attention_with_a_prefix_mask_of_more_keys_than_queries():
    """The shared-prefix text path: S queries over P + S keys (P prefix keys all visible)."""
    P, S = 9, 4
    q = _qkv((2, 4, S, 8), seed=1)[0]
    _, k, v = _qkv((2, 4, P + S, 8), seed=2)
    mask = causal_mask(S, prefix=P)
    assert mask.shape == (S, P + S)
    assert torch.isinf(mask).sum() == S * (S - 1) // 2
    fast, ref = _both(lambda *t: attention(*t, mask), q, k, v)
    torch.testing.assert_close(fast, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", [(6, 7, 16), (2, 3, 7, 16)], ids=["3d", "4d"])
def test_attention_scale_one_on_prescaled_queries(shape):
    """CLIP's attention pool scales the queries itself and passes ``scale=1``."""
    q, k, v = _qkv(shape, seed=3)
    scaled = q * shape[-1] ** -0.5
    fast, ref = _both(lambda *t: attention(*t, scale=1), scaled, k, v)
    torch.testing.assert_close(fast, ref, rtol=RTOL, atol=ATOL)
    with reference_kernels():
        default = attention(q, k, v)
    torch.testing.assert_close(ref, default, rtol=RTOL, atol=ATOL)
    # and a scale other than 1 really scales: not the same function as scale=1
    assert not torch.allclose(attention(scaled, k, v), fast, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "causal"])
def test_attention_gradients_fast_equal_reference(masked):
    shape = (2, 3, 7, 16)
    grads = []
    for reference in (False, True):
        q, k, v = _qkv(shape, seed=4, requires_grad=True)
        mask = causal_mask(shape[-2]) if masked else None
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        with reference_kernels(reference):
            (attention(q, k, v, mask) * weight).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for fast, ref in zip(*grads, strict=True):
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ conv + BatchNorm
def _conv_bn(bias: bool = False, seed: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(6)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.weight.copy_(torch.rand(6, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(6, generator=g))
        bn.running_mean.copy_(torch.randn(6, generator=g))
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
    return conv, bn.eval()


X = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_folds_at_inference_and_equals_bn_of_conv(bias):
    conv, bn = _conv_bn(bias)
    with torch.no_grad():
        expected = bn(conv(X))
        out = conv_bn(conv, bn, X)
    assert getattr(bn, "_folded", None) is not None  # the folded path ran
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_conv_bn_reuses_the_folded_weights():
    conv, bn = _conv_bn()
    with torch.no_grad():
        conv_bn(conv, bn, X)
        cache = bn._folded
        conv_bn(conv, bn, X)
    assert bn._folded is cache


def test_conv_bn_channels_last_input_and_weights():
    conv, bn = _conv_bn(bias=True)
    conv.to(memory_format=torch.channels_last)
    x = X.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(X)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [
    "bn.running_mean.add_(1)",
    "bn.running_var.mul_(4)",
    "bn.weight.mul_(-2)",
    "bn.bias.sub_(3)",
    "conv.weight.mul_(2)",
    "conv.bias.add_(1)",
])
def test_conv_bn_cache_follows_in_place_changes(change):
    conv, bn = _conv_bn(bias=True)
    with torch.no_grad():
        before = conv_bn(conv, bn, X)
        exec(change, {}, {"bn": bn, "conv": conv})  # an in-place update (optimiser, load)
        after = conv_bn(conv, bn, X)
        expected = bn(conv(X))
    assert not torch.allclose(after, before, atol=1e-2)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_conv_bn_cache_follows_load_state_dict_and_replaced_parameters():
    conv, bn = _conv_bn(bias=True)
    other_conv, other_bn = _conv_bn(bias=True, seed=5)
    with torch.no_grad():
        conv_bn(conv, bn, X)
        bn.load_state_dict(other_bn.state_dict())
        torch.testing.assert_close(conv_bn(conv, bn, X), bn(conv(X)), rtol=1e-5, atol=1e-5)
        conv.weight = nn.Parameter(other_conv.weight.clone())
        torch.testing.assert_close(conv_bn(conv, bn, X), bn(conv(X)), rtol=1e-5, atol=1e-5)


def test_conv_bn_in_training_mode_is_bn_of_conv_with_batch_statistics():
    conv, bn = _conv_bn()
    bn.train()
    mean = bn.running_mean.clone()
    with torch.no_grad():
        out = conv_bn(conv, bn, X)
    assert not hasattr(bn, "_folded")
    assert not torch.equal(bn.running_mean, mean)  # the statistics were updated
    ref_conv, ref_bn = _conv_bn()
    ref_bn.train()
    with torch.no_grad():
        torch.testing.assert_close(out, ref_bn(ref_conv(X)), rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=0)


def test_conv_bn_with_autograd_is_not_folded_and_trains_the_conv():
    conv, bn = _conv_bn()
    out = conv_bn(conv, bn, X)
    assert out.requires_grad and not hasattr(bn, "_folded")
    torch.testing.assert_close(out, bn(conv(X)), rtol=0, atol=0)
    out.square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert bn.weight.grad is not None


def test_conv_bn_not_folded_under_the_reference_kernels():
    conv, bn = _conv_bn()
    with torch.no_grad(), reference_kernels():
        out = conv_bn(conv, bn, X)
        expected = bn(conv(X))
    assert not hasattr(bn, "_folded")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ------------------------------------------------------------------ text encoder
CONTEXT_LENGTH, N_CTX, WIDTH = 13, 8, 64
# Different BPE lengths (1 to 3 tokens) and an empty name (SOT, EOT only).
NAMES = ["cat", "traffic light", "pool table", "crème", "", "sky", "chest of drawers"]


def _encoder(layers: int = 3) -> CLIPTextEncoder:
    torch.manual_seed(0)
    return CLIPTextEncoder(context_length=CONTEXT_LENGTH, width=WIDTH, layers=layers, heads=4,
                           embed_dim=32).eval()


def _contexts(batch: int | None) -> torch.Tensor | None:
    if batch is None:
        return None
    return torch.randn(batch, N_CTX, WIDTH, generator=torch.Generator().manual_seed(batch)) * 0.1


def _tokens(names, contexts) -> torch.Tensor:
    n_ctx = 0 if contexts is None else contexts.shape[1]
    return tokenize(names, CONTEXT_LENGTH - n_ctx)


@pytest.mark.parametrize("batch", [None, 1, 2], ids=["no-contexts", "B1", "B2"])
def test_text_encoder_shared_prefix_equals_full_forward_and_gradients(batch):
    enc = _encoder()
    base = _contexts(batch)
    tokens = _tokens(NAMES, base)
    lengths = (tokens.argmax(-1)).tolist()
    assert len(set(lengths)) >= 3  # names of different token lengths
    weights = [enc.transformer.resblocks[0].attn.in_proj_weight, enc.token_embedding.weight,
               enc.positional_embedding, enc.transformer.resblocks[-1].mlp.c_fc.weight]
    results = []
    for reference in (False, True):
        enc.zero_grad(set_to_none=True)
        contexts = None if base is None else base.clone().requires_grad_(True)
        with reference_kernels(reference):
            out = enc(tokens, contexts)
        g = torch.Generator().manual_seed(7)
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        results.append((out.detach(), None if contexts is None else contexts.grad,
                        [w.grad.clone() for w in weights]))
    (fast, fast_ctx, fast_w), (ref, ref_ctx, ref_w) = results
    expected_shape = (len(NAMES), 32) if batch is None else (batch, len(NAMES), 32)
    assert fast.shape == ref.shape == expected_shape
    # Measured: <= 7e-7 of the largest value for outputs and gradients alike.
    assert_rel_close(fast, ref, 1e-5)
    if batch is not None:
        assert ref_ctx.abs().max() > 1e-4
        assert_rel_close(fast_ctx, ref_ctx, 1e-5)
    for a, b in zip(fast_w, ref_w, strict=True):
        assert b.abs().max() > 1e-4
        assert_rel_close(a, b, 1e-5)


def test_text_encoder_shared_prefix_under_bf16_autocast_stays_close():
    enc = _encoder()
    contexts = _contexts(2)
    tokens = _tokens(NAMES, contexts)
    with torch.no_grad():
        with reference_kernels():
            ref = enc(tokens, contexts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = enc(tokens, contexts)
    cos = torch.nn.functional.cosine_similarity(fast.float(), ref, dim=-1)
    assert cos.min() > 0.999


def test_text_encoder_rows_with_another_start_token_fall_back_to_the_full_path():
    enc = _encoder()
    contexts = _contexts(2)
    tokens = _tokens(NAMES, contexts)
    tokens[2, 0] = tokens[2, 1]  # no longer a shared start token
    with torch.no_grad():
        fast = enc(tokens, contexts)
        with reference_kernels():
            ref = enc(tokens, contexts)
    # Were the prefix shared anyway, row 2 would see the start token of row 0.
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    counts = []
    for reference in (False, True):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), reference_kernels(reference), counter:
            enc(tokens, contexts)
        counts.append(counter.get_flop_counts()["Global"])
    linear = [sum(v for op, v in c.items() if "addmm" in str(op)) for c in counts]
    assert linear[0] == linear[1]  # every sequence in full


def _text_flops(enc, tokens, contexts, reference: bool) -> dict[str, int]:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), reference_kernels(reference), counter:
        enc(tokens, contexts)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_text_encoder_fast_path_does_far_less_work_for_150_classes():
    """With K classes of T token positions (start token first) behind n_ctx contexts,
    the reference runs K sequences of L = n_ctx + T positions; the shared path runs the
    P = 1 + n_ctx prefix positions (start token and contexts) once and S suffix positions
    per class, S the last end-token position (<= T - 1). Every linear layer of the
    transformer is per position, so its multiply-adds scale exactly as
    (P + K*S) / (K*L): for ADE20K's 150 names (T = 5, S = 4) that is 609 / 1950 = 0.31.
    The attention products shrink by S/L likewise (S queries instead of L, each over at
    most L keys) and the final projection (one row per class) is the same, so the total
    is below 0.35 of the reference."""
    enc = _encoder(layers=2)
    names = load_class_names("ade20k")
    contexts = _contexts(1)
    tokens = _tokens(names, contexts)
    K, T = tokens.shape
    P, L = 1 + N_CTX, N_CTX + T
    S = int(tokens.argmax(-1).max())
    assert (K, T, S, L) == (150, 5, 4, CONTEXT_LENGTH)
    fast = _text_flops(enc, tokens, contexts, reference=False)
    ref = _text_flops(enc, tokens, contexts, reference=True)
    linear_fast, linear_ref = fast["aten.addmm"], ref["aten.addmm"]
    assert linear_fast * K * L == linear_ref * (P + K * S)
    total_fast, total_ref = sum(fast.values()), sum(ref.values())
    assert total_fast < 0.35 * total_ref
    assert total_fast > 0.25 * total_ref  # nothing left uncounted


# ------------------------------------------------------------------ loss
def _channels_last_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 150, 64, 96, generator=g).contiguous(memory_format=torch.channels_last)
    return logits, torch.randint(0, 150, (2, 64, 96), generator=g)


def test_cross_entropy_on_channels_last_logits_fast_is_close():
    logits, target = _channels_last_logits()
    plain = F.cross_entropy(logits, target, reduction="none").mean()
    torch.testing.assert_close(cross_entropy(logits, target), plain, rtol=1e-6, atol=1e-6)


def test_cross_entropy_under_the_reference_kernels_is_the_plain_computation():
    """The reference path computes as written, bit for bit (what the golden outputs pin):
    the ViT's training logits are channels_last even with the reference kernels (its
    token grid is permuted into NCHW), so a memory-format shortcut there changes the
    pinned ``tiny_denseclip_vit.loss_seg``."""
    logits, target = _channels_last_logits()
    with reference_kernels():
        ours = cross_entropy(logits, target)
    plain = F.cross_entropy(logits, target, reduction="none").mean()
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)


# ------------------------------------------------------------------ FLOP counting
def test_flops_count_with_the_reference_kernels_whatever_the_caller_chooses():
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config("tiny_denseclip_res"))
    fast_caller = complexity(model, (64, 64))
    with reference_kernels():
        reference_caller = complexity(model, (64, 64))
    assert fast_caller == reference_caller
    assert fast_kernels()
    # The comparison has teeth: the model itself does count differently per kernel choice.
    x = torch.zeros(1, 3, 64, 64)
    totals = []
    for reference in (False, True):
        for m in model.modules():
            if hasattr(m, "clear_cache"):
                m.clear_cache()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), reference_kernels(reference), counter:
            model.eval()(x)
        totals.append(counter.get_total_flops())
    assert totals[0] < totals[1]
    plain = complexity(model, (64, 64), extra_ops=False)["gmacs"]["total"]
    assert round(plain * 1e9) == totals[1] // 2  # what complexity counts: the reference
