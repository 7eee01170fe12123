"""The inference-time cache of text embeddings (post-model prompting)."""

from __future__ import annotations

import torch

import denseclip
from denseclip.runtime import reference_kernels


def build():
    torch.manual_seed(0)
    return denseclip.build_model(denseclip.load_config("tiny_denseclip_res")).eval()


def count_text_calls(model):
    calls = []
    model.guidance.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_cache_reuses_text_features_and_gives_identical_predictions():
    model = build()
    calls = count_text_calls(model)
    x = torch.randn(2, 3, 64, 64)
    # Reference kernels: the fast ones fold BatchNorm only without autograd, which would
    # change the last bits of `uncached` for a reason unrelated to the cache.
    with torch.no_grad(), reference_kernels():
        first = model(x)
        second = model(x)
    assert len(calls) == 1  # computed once for both images' forward passes
    with torch.enable_grad(), reference_kernels():
        uncached = model(x)
    assert len(calls) == 2  # with autograd the text tower runs every time
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, uncached.detach(), rtol=0, atol=0)


def test_cache_is_invalidated_by_class_list_and_weight_changes():
    model = build()
    calls = count_text_calls(model)
    names = list(model.class_names)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        model.set_classes(names[::-1])
        reversed_names = model(x)
        assert len(calls) == 2
        assert not torch.equal(base, reversed_names)
        model.set_classes(names)
        model.guidance.contexts.add_(0.5)  # an in-place update, as an optimiser step does
        moved = model(x)
        assert len(calls) == 3
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["guidance.text_encoder.text_projection"].mul_(2)
        model.load_state_dict(state)
        model(x)
        assert len(calls) == 4
    assert not torch.equal(base, moved)
