"""Semantic-segmentation metrics (mIoU, mAcc, aAcc) from an integer confusion matrix.

The numbers follow mmsegmentation 0.19 (``total_area_to_metrics`` + ``CustomDataset.evaluate``),
which the DenseCLIP results were reported with. Over the whole evaluation set, per class ``c``:

* ``TP = intersect[c]``, ``label_area[c]`` = ground-truth pixels of ``c``,
  ``pred_area[c]`` = pixels predicted as ``c`` *among labelled pixels* (predictions on ignored
  pixels never count), ``union[c] = label_area[c] + pred_area[c] - TP``;
* ``IoU[c] = TP / union`` and ``Acc[c] = TP / label_area``;
* ``mIoU`` / ``mAcc`` are the NaN-ignoring means of those vectors, ``aAcc = sum(TP) /
  sum(label_area)``; all are reported in percent.

Classes absent from the ground truth, exactly as mmseg 0.19 treats them:

* absent from ground truth *and* never predicted: ``union == 0``, so IoU and Acc are NaN and
  the class is left out of both means;
* absent from ground truth but predicted somewhere (on labelled pixels): ``union > 0`` and
  ``TP == 0``, so **IoU is 0 and is averaged into mIoU** (a false-positive-only class lowers
  the score), while Acc is NaN (``0 / 0``) and is left out of mAcc.

mmseg rounds the summary to two decimals when it prints it; :meth:`SegmentationMetric.compute`
returns unrounded values and :meth:`SegmentationMetric.format_table` prints two decimals.
Counts are accumulated as exact int64 (mmseg uses float histograms, which are exact at any
realistic dataset size), so the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


class SegmentationMetric:
    """Accumulates a ``K x K`` confusion matrix (rows: ground truth, columns: prediction).

    Args:
        num_classes: number of classes ``K``; valid labels and predictions are ``0..K-1``.
        ignore_index: ground-truth value that marks pixels left out of the evaluation.
        class_names: optional names used by :meth:`compute` and :meth:`format_table`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = list(class_names) if class_names is not None else None
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Zero the accumulated counts."""
        self.confusion = torch.zeros_like(self.confusion)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one prediction / ground-truth pair (``HxW``) or a batch of them (``BxHxW``).

        ``pred`` holds class indices (an argmax map); ``target`` holds class indices or
        ``ignore_index``. Any other value raises ``ValueError``. The counts live on the device
        of the first tensors passed in (and follow later ones).
        """
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer class maps")
        target = target.to(pred.device)
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        keep = target != self.ignore_index
        pred = pred[keep]
        target = target[keep]
        k = self.num_classes
        if target.numel():
            lo = torch.minimum(pred.min(), target.min())
            hi = torch.maximum(pred.max(), target.max())
            if lo.item() < 0 or hi.item() >= k:
                raise ValueError(
                    f"labels/predictions must lie in [0, {k}) or equal ignore_index "
                    f"{self.ignore_index}; found values in [{lo.item()}, {hi.item()}]"
                )
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        if self.confusion.device != counts.device:
            self.confusion = self.confusion.to(counts.device)
        self.confusion += counts

    def all_reduce(self) -> None:
        """Sum the matrix over all ``torch.distributed`` processes, in place.

        Does nothing when the default process group is not initialised. Call it once, after
        the last :meth:`update` on every process (calling it twice double-counts). The
        reduction is an exact int64 sum; with the NCCL backend the matrix travels through the
        current CUDA device, otherwise (gloo) through the CPU.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        buf = self.confusion.to(device).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.confusion = buf.to(self.confusion.device)

    def _names(self, class_names: Sequence[str] | None) -> list[str]:
        names = class_names if class_names is not None else self.class_names
        if names is None:
            return [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"got {len(names)} class names for {self.num_classes} classes")
        return [str(n) for n in names]

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Metrics in percent: ``{"mIoU", "mAcc", "aAcc", "per_class"}``.

        ``per_class`` is a list of ``{"name", "IoU", "Acc"}`` dicts in class order; undefined
        values are ``nan`` (see the module docstring for when that happens).
        """
        cm = self.confusion.detach().to("cpu", torch.float64)
        tp = cm.diagonal()
        label_area = cm.sum(dim=1)
        pred_area = cm.sum(dim=0)
        union = label_area + pred_area - tp
        # 0/0 gives NaN, as in mmseg; x/0 with x > 0 cannot happen (TP <= both areas).
        iou = tp / union
        acc = tp / label_area
        a_acc = tp.sum() / label_area.sum()
        names = self._names(class_names)
        per_class = [
            {"name": name, "IoU": float(iou[i]) * 100.0, "Acc": float(acc[i]) * 100.0}
            for i, name in enumerate(names)
        ]
        return {
            "mIoU": float(torch.nanmean(iou)) * 100.0,
            "mAcc": float(torch.nanmean(acc)) * 100.0,
            "aAcc": float(a_acc) * 100.0,
            "per_class": per_class,
        }

    def format_table(self, class_names: Sequence[str] | None = None) -> str:
        """A plain-text per-class table (IoU, Acc) followed by the summary line."""
        res = self.compute(class_names)
        rows = [(c["name"], _fmt(c["IoU"]), _fmt(c["Acc"])) for c in res["per_class"]]
        header = ("Class", "IoU", "Acc")
        w0 = max(len(header[0]), *(len(r[0]) for r in rows))
        w1 = max(len(header[1]), *(len(r[1]) for r in rows))
        w2 = max(len(header[2]), *(len(r[2]) for r in rows))

        def line(a: str, b: str, c: str) -> str:
            return f"| {a:<{w0}} | {b:>{w1}} | {c:>{w2}} |"

        rule = f"+-{'-' * w0}-+-{'-' * w1}-+-{'-' * w2}-+"
        out = [rule, line(*header), rule, *(line(*r) for r in rows), rule]
        summary = f"aAcc: {_fmt(res['aAcc'])}  mIoU: {_fmt(res['mIoU'])}  mAcc: {_fmt(res['mAcc'])}"
        out.append(summary)
        return "\n".join(out)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2f}"
