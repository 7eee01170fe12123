"""Model complexity: parameter counts and multiply-adds (GMACs) per top-level module.

Multiply-adds are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one
forward pass of a ``1×3×H×W`` batch in eval mode under ``no_grad``. PyTorch's counter
reports two FLOPs per multiply-add; we halve it, so one multiply-add is one operation,
the convention of fvcore and of the paper's FLOPs (DESIGN §8).

What is counted (GMACs = counter total / 2 / 1e9):

* PyTorch's own formulas: convolutions (``c_out · c_in/groups · k_h · k_w`` per output
  position; a transposed convolution per *input* position), and ``mm``/``addmm``/``bmm``/
  ``baddbmm`` (``m · k · n`` per product; bias additions are free). Together these cover
  every convolution and linear layer, the attention products ``q·kᵀ`` and ``attn·v``
  (written as explicit matmuls in :mod:`denseclip.models`), the ViT projection and the
  score-map einsum.
* fvcore's element-wise estimates for the ops of its default table (:data:`EXTRA_OPS`,
  registered through ``custom_mapping``): batch norm with running statistics 2 per input
  element (1 without an affine transform; 5 / 4 when it computes batch statistics),
  layer and group norm 5 per input element (4 without affine), bilinear upsampling 4 per
  output element, nearest upsampling 1 per output element, adaptive average pooling 1 per
  input element and bilinear grid sampling 4 per output element.
* Nothing else costs anything: activations, softmax, element-wise additions and
  products, average/max pooling, embedding lookups and L2 normalisation are zero, as in
  fvcore.

With the element-wise estimates the counts reproduce DESIGN §8's figures of the official
code to their 0.1 G precision; without them (``extra_ops=False``) they are about 0.7 %
lower for the ResNet presets and 0.2 % for ViT-B.

Per-module figures come from the counter's module breakdown, which attributes every op to
*all* enclosing modules, so only disjoint module paths are combined: ``backbone``,
``text_encoder`` (``guidance.text_encoder``), ``context_decoder`` (the rest of
``guidance``: context decoder, gamma update, score-map einsum), ``neck``, ``head``, and
``other`` (ops the model runs itself, outside those children: the final resize of the
logits to the input size). They sum to the total.

Detectors (models with a ``forward_dummy`` method: :mod:`denseclip.models.detection`) are
counted the way the official detection FLOPs were (DESIGN §8): ``forward_dummy`` on the raw
``1×3×H×W`` tensor (no resize, no post-processing; Mask R-CNN runs 1000 fixed proposals
through the box head and the first 100 through the mask head, RoIAlign costing nothing),
with the default size 1280×800 (H×W, the default of mmdet's FLOPs script). Their parts are
``backbone``, ``text_encoder``, ``context_decoder``, ``neck`` and ``head`` (RetinaNet) or
``rpn`` and ``roi_heads`` (Mask R-CNN), and ``other``.

Transposed convolutions. The correct count (``transposed_conv="input"``, PyTorch's) is
``c_in · c_out/groups · k_h · k_w`` per *input* position. fvcore releases before late 2021
counted them per *output* position (``batch · prod(weight shape) · prod(output spatial
size)``, ``transposed_conv="output"``): for the stride-2 2×2 deconvolutions in the ViT
necks and the Mask R-CNN mask head that is 4× the true cost. The official detection
figures include this over-count (15.4 G of Mask R-CNN's 301.4 at 1280×800, from the 100
mask RoIs), so detectors default to ``"output"`` and reproduce them; segmentors default to
``"input"``, which reproduces DESIGN §8's corrected segmentation table (the paper's ViT
figures, 1037.4 / 1043.1, are the ``"output"`` counts).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..runtime import reference_kernels
from ..tasks.detection import DETECTION_INPUT_SIZE

__all__ = ["DETECTION_INPUT_SIZE", "EXTRA_OPS", "MODULES", "TRANSPOSED_CONV", "complexity",
           "count_macs", "count_parameters", "format_report", "is_detector"]

aten = torch.ops.aten

# FlopCounterMode counts one multiply-add as two FLOPs; the formulas below return the
# same unit, so each of fvcore's per-element costs (multiply-adds) is doubled.
_FLOPS_PER_MAC = 2


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _per_element(macs: int, on_output: bool):
    """``macs`` per element of the output (or of the first input)."""

    def formula(x_shape, *args, out_shape=None, **kwargs) -> int:
        return _FLOPS_PER_MAC * macs * _numel(out_shape if on_output else x_shape)

    return formula


def _norm(weight_index: int):
    """Layer / group norm: 5 per input element with an affine transform, 4 without."""

    def formula(*args, out_shape=None, **kwargs) -> int:
        affine = args[weight_index] is not None
        return _FLOPS_PER_MAC * (5 if affine else 4) * _numel(args[0])

    return formula


def _batch_norm(*args, out_shape=None, **kwargs) -> int:
    """Batch norm: 2 per input element with running statistics and an affine transform
    (1 without affine); 5 / 4 when it computes batch statistics (``training``)."""
    # The training flag is the first bool after (input, weight, bias); the eval-only
    # ``_native_batch_norm_legit_no_training`` has none.
    training = kwargs.get("training")
    if training is None:
        training = next((a for a in args[3:] if isinstance(a, bool)), False)
    affine = args[1] is not None
    per_element = (5 if affine else 4) if training else (2 if affine else 1)
    return _FLOPS_PER_MAC * per_element * _numel(args[0])


#: aten op -> FLOP formula (FlopCounterMode units: 2 per multiply-add), fvcore's defaults.
EXTRA_OPS: dict[Any, Any] = {
    aten.native_batch_norm: _batch_norm,
    aten._native_batch_norm_legit: _batch_norm,
    aten._native_batch_norm_legit_no_training: _batch_norm,
    aten.cudnn_batch_norm: _batch_norm,
    aten.miopen_batch_norm: _batch_norm,
    aten.native_layer_norm: _norm(2),  # (input, normalized_shape, weight, bias, eps)
    aten.native_group_norm: _norm(1),  # (input, weight, bias, N, C, HxW, group, eps)
    aten.upsample_bilinear2d: _per_element(4, on_output=True),
    aten.upsample_nearest2d: _per_element(1, on_output=True),
    aten._adaptive_avg_pool2d: _per_element(1, on_output=False),
    aten.grid_sampler_2d: _per_element(4, on_output=True),
}


def _conv_over_output(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """Any convolution as ``batch · prod(weight shape) · prod(output spatial size)``:
    PyTorch's count for a direct convolution, fvcore's pre-2021 count for a transposed one
    (per output instead of per input position)."""
    return _FLOPS_PER_MAC * x_shape[0] * _numel(w_shape) * _numel(out_shape[2:])


#: The convolution ops of FlopCounterMode's table (all take (input, weight, ...)).
_CONV_OPS = (aten.convolution, aten._convolution, aten.cudnn_convolution,
             aten.convolution_overrideable, aten._slow_conv2d_forward)

#: Ways of counting a transposed convolution: per input position (correct) or per output
#: position (fvcore before late 2021; the official detection figures).
TRANSPOSED_CONV = ("input", "output")


def _custom_mapping(extra_ops: bool, transposed_conv: str = "input") -> dict[Any, Any]:
    if transposed_conv not in TRANSPOSED_CONV:
        raise ValueError(f"transposed_conv must be one of {TRANSPOSED_CONV}, "
                         f"got {transposed_conv!r}")
    mapping: dict[Any, Any] = dict(EXTRA_OPS) if extra_ops else {}
    if transposed_conv == "output":
        mapping.update((op, _conv_over_output) for op in _CONV_OPS)
    # FlopCounterMode decomposes any op *overload* it has no entry for before counting
    # (e.g. nearest upsampling into index ops), so the overloads are keyed too; the
    # formula itself is looked up by overload packet.
    for packet, formula in list(mapping.items()):
        for name in packet.overloads():
            mapping[getattr(packet, name)] = formula
    return mapping


class _MethodCall(nn.Module):
    """Calls ``model.<method>`` as a module call, so that the counter's module tracker
    names every submodule of ``model`` by its path (it names the descendants of the first
    module entered; a plain method call enters none)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method)(*args, **kwargs)


def count_macs(module: nn.Module, *inputs: Any, extra_ops: bool = True,
               transposed_conv: str = "input", method: str | None = None,
               **kwargs: Any) -> dict[str, int]:
    """Multiply-adds of ``module(*inputs, **kwargs)`` (or of ``module.<method>(...)``) run
    under ``no_grad`` (as it is: the caller chooses train or eval mode).

    Returns the counter's module breakdown in multiply-adds, keyed by module path
    relative to ``module`` (``""`` is the whole call, ``"backbone"``,
    ``"guidance.text_encoder"``, ...). Each path's figure *includes* its submodules; only
    modules that were called appear (with ``method``, ``module`` itself is not one).
    ``transposed_conv`` is one of :data:`TRANSPOSED_CONV` (see the module docstring).
    """
    for m in module.modules():  # count the text encoder even when its output is cached
        if hasattr(m, "clear_cache"):
            m.clear_cache()
    mapping = _custom_mapping(extra_ops, transposed_conv)
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    call = module if method is None else _MethodCall(module, method)
    with torch.no_grad(), reference_kernels(), counter:  # explicit attention matmuls, full text
        call(*inputs, **kwargs)
    # The counter names modules "<RootClass>.<path>" and the whole call "Global".
    root = type(module).__name__ + "." if method is None else "_MethodCall.model."
    out = {"": counter.get_total_flops() // _FLOPS_PER_MAC}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root):
            out[name[len(root):]] = sum(ops.values()) // _FLOPS_PER_MAC
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``total``, ``trainable`` (requires_grad) and ``excluding_text_encoder`` (every
    parameter outside ``guidance.text_encoder``)."""
    text = _text_encoder(model)
    text_ids = {id(p) for p in text.parameters()} if text is not None else set()
    params = list(model.parameters())  # shared parameters are yielded once
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "excluding_text_encoder": sum(p.numel() for p in params if id(p) not in text_ids),
    }


def _text_encoder(model: nn.Module) -> nn.Module | None:
    guidance = getattr(model, "guidance", None)
    return getattr(guidance, "text_encoder", None)


def _module_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


#: Disjoint parts of a segmentor (and a RetinaNet) reported by :func:`complexity`
#: (``other`` is the rest). A Mask R-CNN reports ``rpn`` and ``roi_heads`` for ``head``.
MODULES = ("backbone", "text_encoder", "context_decoder", "neck", "head")



def _subtree(macs: dict[str, int], path: str) -> int:
    """Multiply-adds under module ``path``: its own figure when it was called, else the
    sum over its outermost called descendants (``rpn`` when only ``rpn.head`` ran)."""
    if path in macs:
        return macs[path]
    prefix = path + "."
    inside = [p for p in macs if p.startswith(prefix)]
    return sum(macs[p] for p in inside
               if not any(p.startswith(q + ".") for q in inside if q != p))


def is_detector(model: nn.Module) -> bool:
    """Whether ``model`` is counted through ``forward_dummy`` (the detectors)."""
    return callable(getattr(model, "forward_dummy", None))


def complexity(model: nn.Module, input_size: Sequence[int] | None = None,
               extra_ops: bool = True, transposed_conv: str | None = None) -> dict[str, Any]:
    """Parameters and multiply-adds of one forward pass of a ``1×3×H×W`` batch.

    The model runs in eval mode under ``no_grad`` on its own device; its training flag is
    restored afterwards. A model moved to the ``meta`` device gives the same counts
    fastest: only shapes propagate, no arithmetic runs. ``extra_ops=False`` drops the
    element-wise estimates (:data:`EXTRA_OPS`) and keeps convolutions and matrix
    products only. A detector (a model with ``forward_dummy``) is counted through that
    method, without pre- or post-processing (module docstring).

    ``input_size`` defaults to 1024×1024 for segmentors and :data:`DETECTION_INPUT_SIZE`
    for detectors; ``transposed_conv`` (one of :data:`TRANSPOSED_CONV`) to ``"input"``
    for segmentors and ``"output"`` for detectors, the conventions of DESIGN §8's tables.

    Returns ``{"input_size": [H, W], "transposed_conv", "params": {"total",
    "trainable", "excluding_text_encoder"}, "gmacs": {"total", "excluding_text_encoder",
    "by_module": {"backbone", "text_encoder", "context_decoder", "neck", "head" (Mask
    R-CNN: "rpn", "roi_heads"), "other"}}}``: parameters as ints, GMACs (10^9
    multiply-adds) as floats. Parts the model lacks (the guidance of a baseline) count 0;
    ``by_module`` sums to ``total``.
    """
    detector = is_detector(model)
    if input_size is None:
        input_size = DETECTION_INPUT_SIZE if detector else (1024, 1024)
    if len(input_size) != 2:
        raise ValueError(f"input_size must be (H, W), got {tuple(input_size)}")
    if transposed_conv is None:
        transposed_conv = "output" if detector else "input"
    h, w = (int(s) for s in input_size)
    images = torch.zeros(1, 3, h, w, device=_module_device(model))
    was_training = model.training
    model.eval()
    try:
        macs = count_macs(model, images, extra_ops=extra_ops, transposed_conv=transposed_conv,
                          method="forward_dummy" if detector else None)
    finally:
        model.train(was_training)

    total = macs[""]
    text = _subtree(macs, "guidance.text_encoder")
    heads = ("rpn", "roi_heads") if hasattr(model, "roi_heads") else ("head",)
    by_module = {
        "backbone": _subtree(macs, "backbone"),
        "text_encoder": text,
        "context_decoder": _subtree(macs, "guidance") - text,
        "neck": _subtree(macs, "neck"),
        **{name: _subtree(macs, name) for name in heads},
    }
    by_module["other"] = total - sum(by_module.values())
    return {
        "input_size": [h, w],
        "transposed_conv": transposed_conv,
        "params": count_parameters(model),
        "gmacs": {
            "total": total / 1e9,
            "excluding_text_encoder": (total - text) / 1e9,
            "by_module": {name: n / 1e9 for name, n in by_module.items()},
        },
    }


def format_report(result: dict[str, Any], title: str | None = None) -> str:
    """A human-readable table of a :func:`complexity` result."""
    h, w = result["input_size"]
    gmacs, params = result["gmacs"], result["params"]
    total = gmacs["total"]
    rows = list(gmacs["by_module"].items())
    width = max(len("excluding text encoder"), *(len(name) for name, _ in rows)) + 2
    lines = []
    if title:
        lines.append(title)
    lines.append(f"input 1x3x{h}x{w}, one multiply-add = one operation")
    if result.get("transposed_conv") == "output":
        lines.append("transposed convolutions counted per output position (fvcore < 2021)")
    lines.append(f"{'module':<{width}}{'GMACs':>12}{'share':>9}")
    lines.append("-" * (width + 21))
    for name, value in rows:
        share = 100.0 * value / total if total else 0.0
        lines.append(f"{name:<{width}}{value:>12.3f}{share:>8.1f}%")
    lines.append("-" * (width + 21))
    lines.append(f"{'total':<{width}}{total:>12.3f}")
    lines.append(f"{'excluding text encoder':<{width}}{gmacs['excluding_text_encoder']:>12.3f}")
    lines.append("")
    lines.append(f"{'parameters':<{width}}{'M':>12}")
    lines.append("-" * (width + 12))
    for key, label in (("total", "total"), ("trainable", "trainable"),
                       ("excluding_text_encoder", "excluding text encoder")):
        lines.append(f"{label:<{width}}{params[key] / 1e6:>12.3f}")
    return "\n".join(lines)
