"""Where a model's parts came from, and which outputs are meaningless because of it.

A model's state-dict keys fall into named *parts* (:func:`part_of`: backbone, text encoder,
contexts, context decoder, neck, head). Two facts decide whether an output can be trusted:

* the :class:`~denseclip.weights.checkpoint.LoadReport` of the weights it runs with: its
  ``new`` keys were left at their random initialisation;
* for this package's training checkpoints, the ``provenance`` the trainer stores
  (:func:`provenance_record`): which weights file initialised each part before training
  (``loaded``) and which parts training did not change (``fixed``: frozen, or learning rate
  multiplier 0).

The head's output over the trained classes depends on every part, and a part left at
initialisation by the load makes it meaningless. Open-vocabulary scores of names typed at
prediction time also need a text encoder that knows words: CLIP's. A text encoder that no
CLIP weights initialised (e.g. the quickstart's, random and trained, if at all, on a few
class names) gives meaningless scores for names outside the trained ones.
:func:`untrained_message` turns these facts into the one warning line that ``predict``,
``demo`` and ``test`` print (:class:`UntrainedPartsWarning`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# (pattern on a model key, part name), the first match wins; order = order in messages
PARTS = (
    (r"^guidance\.text_encoder\.", "text encoder"),
    (r"^guidance\.(contexts|prompt_generator\.)", "contexts"),
    (r"^guidance\.", "context decoder"),
    (r"^backbone\.", "backbone"),
    (r"^neck\.", "neck"),
    (r"^(head|rpn|roi_heads)\.", "head"),
)
PART_NAMES = tuple(dict.fromkeys(name for _, name in PARTS))
# what open-vocabulary scores depend on besides the image side
OPEN_VOCAB_PARTS = ("text encoder", "contexts", "context decoder")
_BOOKKEEPING = re.compile(r"\.num_batches_tracked$")


class UntrainedPartsWarning(UserWarning):
    """Outputs depend on model parts that were never trained or loaded."""


def part_of(key: str) -> str | None:
    """The part a model key belongs to (``None`` for bookkeeping buffers and keys of no
    named part)."""
    if _BOOKKEEPING.search(key):
        return None
    return next((name for pattern, name in PARTS if re.search(pattern, key)), None)


def parts_of(keys: Iterable[str]) -> list[str]:
    """The parts that ``keys`` touch, in :data:`PART_NAMES` order."""
    found = {part_of(k) for k in keys}
    return [name for name in PART_NAMES if name in found]


def loaded_parts(reports: Iterable[Any]) -> dict[str, str]:
    """Each part that the load ``reports`` filled, mapped to the first file's name and
    format that did (e.g. ``{"text encoder": "RN50.pt (openai)"}``)."""
    loaded: dict[str, str] = {}
    for report in reports:
        for part in parts_of(report.loaded):
            loaded.setdefault(part, f"{Path(report.path).name} ({report.format})")
    return loaded


def provenance_record(loaded: Mapping[str, str], all_keys: Iterable[str],
                      learning_keys: Iterable[str]) -> dict[str, Any]:
    """What a training checkpoint stores about its run: ``loaded`` (:func:`loaded_parts` of
    the loads of ``load_from``, ``text_weights`` and ``model.pretrained``) and ``fixed``,
    the parts of ``all_keys`` none of whose parameters are among ``learning_keys`` (frozen,
    or at learning-rate multiplier 0)."""
    learning = set(parts_of(learning_keys))
    fixed = [p for p in parts_of(all_keys) if p not in learning]
    return {"loaded": dict(loaded), "fixed": fixed}


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def untrained_message(report: Any, open_vocabulary: bool = False, *,
                      num_classes: int | None = None) -> str | None:
    """One line naming the parts that the outputs depend on but that were never trained or
    loaded, or ``None`` when there are none.

    ``report`` is the :class:`~denseclip.weights.checkpoint.LoadReport` of the model's
    weights (``None``: unknown, nothing to say). ``open_vocabulary``: the outputs include
    scores of class names typed at prediction time, which also need a text encoder that
    CLIP weights initialised; the training checkpoint's ``provenance`` (if it has one) says
    whether any did. ``num_classes`` (the trained class count) makes the sentence concrete."""
    if report is None:
        return None
    phrases = []
    left = parts_of(report.new)
    if left:
        phrases.append(f"the {_join(left)} {'was' if len(left) == 1 else 'were'} left at "
                       f"random initialisation by {Path(report.path).name}")
    provenance = report.extra.get("provenance") if isinstance(report.extra, Mapping) else None
    has_text = any(part_of(k) == "text encoder" for k in report.loaded)
    if open_vocabulary and has_text and isinstance(provenance, Mapping) \
            and "text encoder" not in left \
            and "text encoder" not in (provenance.get("loaded") or {}):
        how = ("nor trained: frozen or at learning-rate multiplier 0"
               if "text encoder" in (provenance.get("fixed") or ()) else
               "only trained from random initialisation"
               + (f" on {num_classes} class names" if num_classes else ""))
        phrases.append(f"the text encoder was never loaded from CLIP weights ({how}), so "
                       f"open-vocabulary scores for names other than the trained classes "
                       f"are meaningless")
    if not phrases:
        return None
    return "untrained parts: " + "; ".join(phrases)
