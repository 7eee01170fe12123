"""Numeric ranges of config fields: :func:`bounded` declares one on a dataclass field,
:class:`Bounds` describes and checks it (the config loader reports a value out of range).
Other value checks a field names as its ``check`` (e.g. :func:`template_problem`) live here
too."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric field (of each item, for a list), declared with
    :func:`bounded` and checked when a config loads. Every float must also be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    length: int | None = None  # lists: exactly this many items
    nonempty: bool = False  # lists: at least one item
    ascending: bool = False  # lists: items in non-decreasing order

    def describe(self) -> str:
        """The range in words, e.g. ``>= 1`` or ``in [0, 1)``."""
        low = (f"[{_number(self.ge)}" if self.ge is not None
               else f"({_number(self.gt)}" if self.gt is not None else None)
        high = (f"{_number(self.le)}]" if self.le is not None
                else f"{_number(self.lt)})" if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"{'<=' if self.le is not None else '<'} {high[:-1]}"
        return "finite"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of range, or None when it is allowed."""
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        each = "each item " if isinstance(value, list) else ""
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                return f"must have {self.length} items"
            if self.nonempty and not value:
                return "must not be empty"
            if self.ascending and any(a > b for a, b in zip(value, value[1:], strict=False)):
                return "must be in ascending order"
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                return f"{each}must be finite"
            if ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le)
                    or (self.lt is not None and v >= self.lt)):
                return f"{each}must be {self.describe()}"
        return None


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def bounded(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
            **bounds: Any) -> Any:
    """A dataclass field with a default (or ``factory``) and its allowed range
    (:class:`Bounds` keywords: ``ge``, ``gt``, ``le``, ``lt``, ``length``, ...)."""
    return field(default=default, default_factory=factory,
                 metadata={"bounds": Bounds(**bounds)})


def template_problem(templates: list[str]) -> str | None:
    """Why a list of prompt templates (``model.text.templates``) is unusable, or None:
    each needs exactly one ``{}`` (a config field's ``check``)."""
    for i, template in enumerate(templates):
        try:
            template.format("")
            ok = template.count("{}") == 1
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            return (f"template [{i}] {template!r} must hold exactly one {{}} (where the class "
                    f"text goes) and no other braces")
    return None
