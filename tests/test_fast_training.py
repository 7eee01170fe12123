"""The fast kernels in training (:mod:`denseclip.runtime`): the cross-entropy of
channels-last logits (:class:`denseclip.models.losses.RowCrossEntropy`, whose backward
works in the buffer of its log-probabilities, and
:class:`~denseclip.models.losses.UpsampledRowCrossEntropy`, which also resizes the logits
in that buffer) against PyTorch's, and whole-model gradients of the fast mode against the
reference.

Bounds: the loss and its gradient in fp32 are the same function up to summation order
(measured relative error ~1e-7, bound 1e-5); the fast kernels' gradients of a tiny
DenseCLIP in fp32 within 1e-3 (relative norm over all parameters, measured 1.2e-4); in
bf16 the fast loss against PyTorch's, each inside the same bf16 model: losses within 1e-5,
gradients apart by under a tenth of what bf16 moves them from the fp32 reference
(measured 0.8 % against 25 %: the tiny random network's BatchNorms amplify any rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import denseclip
from denseclip.models import losses
from denseclip.models.losses import RowCrossEntropy, cross_entropy, upsampled_cross_entropy
from denseclip.runtime import prepare_model, reference_kernels, run_mode
from tests.test_fast_path import scenes

IGNORE = 255


def _maps(seed: int = 0, classes: int = 7, size: int = 24):
    """Channels-last logits (2, K, size, size) that require grad and labels with an
    ignored band."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, size, size, generator=g) * 3
    logits = logits.contiguous(memory_format=torch.channels_last).requires_grad_()
    target = torch.randint(0, classes, (2, size, size), generator=g)
    target[:, :5] = IGNORE
    return logits, target


def _loss_and_grad(logits, target, average, reference: bool):
    logits.grad = None
    with reference_kernels(reference):
        loss = cross_entropy(logits, target, IGNORE, average)
    loss.backward()
    return loss.detach(), logits.grad.clone()


@pytest.mark.parametrize("average", ["all", "valid"])
def test_fast_cross_entropy_matches_pytorch(average):
    logits, target = _maps()
    fast, fast_grad = _loss_and_grad(logits, target, average, reference=False)
    ref, ref_grad = _loss_and_grad(logits, target, average, reference=True)
    assert fast_grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert (ref_grad[:, :, :5] == 0).all() and (fast_grad[:, :, :5] == 0).all()
    # the reference kernels are PyTorch's own, bit for bit
    expected = F.cross_entropy(logits.detach(), target, ignore_index=IGNORE,
                               reduction="none")
    expected = expected.mean() if average == "all" else expected.sum() / (target != IGNORE).sum()
    assert torch.equal(ref, expected)


def test_fast_cross_entropy_per_pixel_values():
    rows = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (50,))
    target[::7] = IGNORE
    loss = RowCrossEntropy.apply(rows, target, IGNORE)
    expected = F.cross_entropy(rows, target, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    weights = torch.rand(50, dtype=torch.float64)  # a non-uniform upstream gradient
    (grad,) = torch.autograd.grad((loss * weights).sum(), rows)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), rows)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_fast_cross_entropy_refuses_a_second_backward():
    logits, target = _maps()
    loss = cross_entropy(logits, target, IGNORE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_fast_cross_entropy_rejects_a_class_out_of_range():
    logits, target = _maps(classes=4)
    target[0, 10, 10] = 9
    with pytest.raises(RuntimeError, match="out of bounds"):
        cross_entropy(logits, target, IGNORE)


@pytest.mark.parametrize(("average", "align_corners"), [("all", False), ("valid", True)])
def test_fast_upsampled_cross_entropy_matches_pytorch(average, align_corners):
    """Resize and loss in one buffer against F.interpolate + F.cross_entropy, on 150
    classes (several blocks of rows for the in-place log-softmax)."""
    small, _ = _maps(seed=1, classes=150, size=16)
    target = _maps(seed=2, classes=150, size=64)[1]
    grads = {}
    for reference in (False, True):
        small.grad = None
        with reference_kernels(reference):
            loss = upsampled_cross_entropy(small, target, IGNORE, average, align_corners)
        loss.backward()
        grads[reference] = (loss.detach(), small.grad.clone())
    expected = F.cross_entropy(
        F.interpolate(small.detach(), size=(64, 64), mode="bilinear",
                      align_corners=align_corners), target, ignore_index=IGNORE,
        reduction="none")
    expected = expected.mean() if average == "all" else expected.sum() / (target != IGNORE).sum()
    assert torch.equal(grads[True][0], expected)  # the reference is PyTorch's, bit for bit
    torch.testing.assert_close(grads[False][0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[False][1], grads[True][1], rtol=1e-4, atol=1e-8)
    assert grads[True][1].abs().max() > 0


def test_fast_upsampled_cross_entropy_refuses_a_second_backward():
    small, _ = _maps(size=8)
    loss = upsampled_cross_entropy(small, _maps(size=16)[1], IGNORE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


# ------------------------------------------------------------------ whole model
@pytest.fixture(scope="module")
def tiny():
    """tiny_denseclip_res without head dropout (its mask depends on the memory format)
    and a batch of two synthetic scenes with ADE20K-style labels."""
    cfg = denseclip.load_config("tiny_denseclip_res", ["model.head_dropout=0"])
    torch.manual_seed(0)
    model = denseclip.build_model(cfg).train()
    images, labels = scenes(cfg, [1, 2])
    labels = labels - 1
    labels[labels < 0] = IGNORE
    return model, images, labels


def _gradients(tiny, precision: str, kernels: str) -> tuple[torch.Tensor, dict]:
    model, images, labels = tiny
    prepare_model(model, kernels)
    model.zero_grad(set_to_none=True)
    with run_mode(precision, kernels, "cpu"):
        losses_ = model(images, labels)
    sum(losses_.values()).backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    prepare_model(model, "fast")
    return torch.cat(grads), {k: v.item() for k, v in losses_.items()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fast_kernels_fp32_gradients_match_the_reference(tiny):
    ref, ref_losses = _gradients(tiny, "fp32", "reference")
    fast, fast_losses = _gradients(tiny, "fp32", "fast")
    assert set(ref_losses) == {"loss_seg", "loss_aux"}
    assert ref.numel() == fast.numel() and ref.norm() > 0
    for key, value in ref_losses.items():
        assert fast_losses[key] == pytest.approx(value, rel=1e-5)
    assert _relative(fast, ref) <= 1e-3


def test_fast_loss_in_bf16_matches_pytorchs(tiny, monkeypatch):
    """The same bf16 model and kernels, with the fast loss and with PyTorch's."""
    fast, fast_losses = _gradients(tiny, "bf16", "fast")

    monkeypatch.setattr(losses, "_rows_layout", lambda logits: False)  # PyTorch's loss
    plain, plain_losses = _gradients(tiny, "bf16", "fast")
    ref, _ = _gradients(tiny, "fp32", "reference")
    assert not torch.equal(plain, ref)  # bf16 did run
    for key, value in plain_losses.items():
        assert fast_losses[key] == pytest.approx(value, rel=1e-5)
    # fp32 rounding in the loss gradient flips some bf16 roundings further back, which the
    # network's BatchNorms amplify: an order of magnitude below what bf16 itself changes
    assert _relative(fast, plain) <= 0.1 * _relative(plain, ref)
