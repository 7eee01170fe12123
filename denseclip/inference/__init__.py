"""Inference for people: :class:`Predictor` turns images into numpy predictions; the
writers turn them into overlays, label maps, heatmaps and JSON (``denseclip predict``).

Modules: :mod:`.predictor` (the predictor), :mod:`.open_vocab` (class files of names
you type, and :func:`embed_classes`: their text embeddings for exported models),
:mod:`.inputs` (images and file lists), :mod:`.video` (video files, cameras and streams).
What it returns and how results become pictures and files belong to the tasks:
:mod:`denseclip.tasks.results`, :mod:`denseclip.tasks.render`,
:mod:`denseclip.tasks.writers` (re-exported here).

Two segmentations, and what to expect from each
-----------------------------------------------
A DenseCLIP segmentor has a decode head trained for a fixed class list (K classes, e.g.
the 150 ADE20K classes), and pixel-text score maps computed from CLIP text embeddings of
class names. :class:`Predictor` always returns the first and, when you give it class names
of your own (``classes=``, ``--classes``, ``--classes-file``), also the second:

* ``labels`` / ``probs`` — the **decode head**, over the trained classes. This is the
  model's real output: its accuracy is the trained model's (e.g. the mIoU of its model-zoo
  row), and it can only ever answer with trained classes.
* ``open_labels`` / ``open_scores`` — the **score map** for your class names: the text
  encoder embeds each name behind the learned contexts, the context decoder refines the
  embeddings against the image (as in training), and the cosine similarity to every pixel
  embedding at stride 32 (stride 16 for ViT) is upsampled bilinearly to the image. It is
  coarse (one score per 32 × 32 block, blurred by the upsampling) and zero-shot: how well it
  works depends on how well CLIP's pre-training knows the words, and on how far your names
  are from the trained ones. Expect rough blobs in the right places for common objects and
  stuff, not the head's boundaries or accuracy. With random weights (no checkpoint) both
  outputs are meaningless.

The neck of a DenseCLIP model always receives the score map of the *trained* classes (it
was trained with K channels), so your class names never change the head's output.

Open-vocabulary class lists: ``--classes "cat,dog,grass"`` embeds each name as written.
``--classes-file`` reads a class file (:mod:`denseclip.classes`): one class per line; a line
``name: text`` shows ``name`` (legend, file names, JSON) but embeds ``text``, which lets you
pick the wording the text encoder sees. Blank lines and lines starting with ``#`` are
skipped. The text context is short:
in the official presets a class text may use at most 3 BPE tokens (``text.context_length -
text.n_ctx - 2``); longer texts are an error naming the class and the limit.
"""

from ..tasks.render import render_detections, render_overlay
from ..tasks.results import DetectionPrediction, PredictionError, Prepared, SegmentationPrediction
from ..tasks.writers import write_detection, write_segmentation
from .inputs import IMAGE_SUFFIXES, collect_inputs, to_rgb
from .open_vocab import ClassEmbeddings, OpenVocabulary, embed_classes, read_open_classes
from .predictor import Predictor

__all__ = [
    "IMAGE_SUFFIXES",
    "ClassEmbeddings",
    "DetectionPrediction",
    "OpenVocabulary",
    "PredictionError",
    "Predictor",
    "Prepared",
    "SegmentationPrediction",
    "collect_inputs",
    "embed_classes",
    "read_open_classes",
    "render_detections",
    "render_overlay",
    "to_rgb",
    "write_detection",
    "write_segmentation",
]
