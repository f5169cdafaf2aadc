"""The classifier interface: a batch of texts in, one Score per text out.

Simple backends implement ``score_batch(texts)``. Backends that read the conversation (guards, the
LLM judge) also implement ``score_items(items)``, where an ``Item`` carries the user turns and the
answer text before the span; ``score_items`` below calls whichever a backend has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

#: Label of a score whose classifier call failed (rules reject the row with ``classifier_error``).
ERROR_LABEL = "error"


def is_unsafe(score: float, threshold: float) -> bool:
    """``score >= threshold`` compared as float32, the precision of the ``scores`` column, so a
    build and a ``refilter`` of its recorded scores always agree."""
    return bool(np.float32(score) >= np.float32(threshold))


@dataclass(frozen=True)
class Score:
    """One classifier verdict on one text; stored in the row's ``scores`` column."""

    classifier: str
    label: str  # "unsafe" | "safe" | "error"
    score: float  # probability-like, higher = more unsafe
    categories: tuple[str, ...] = field(default_factory=tuple)
    #: Not stored in rows: the judge's span start relative to the target text (negative = earlier),
    #: its suggested safe edit, error details.
    detail: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def as_dict(self, target: str) -> dict:
        """The ``scores`` struct for ``target`` (violation, part1, part2, response)."""
        return {
            "classifier": self.classifier,
            "target": target,
            "label": self.label,
            "score": float(self.score),
            "categories": list(self.categories),
        }


@dataclass(frozen=True)
class Item:
    """One span to score, with what a conversation-aware classifier needs around it."""

    text: str  # the span itself (stripped)
    target: str = "response"  # violation, part1, part2 or response
    context: tuple[tuple[str, str], ...] = ()  # (role, content) turns before the assistant answer
    before: str = ""  # the answer text before the span (part1 for the violation)
    raw: str | None = None  # the span exactly as spliced (before + raw is the stream); default text

    @property
    def stream(self) -> str:
        """The assistant answer up to the end of the span, exactly as the model emits it."""
        return self.before + (self.text if self.raw is None else self.raw)


class Classifier(Protocol):
    """A backend that scores texts."""

    name: str

    def score_batch(self, texts: Sequence[str]) -> list[Score]:
        """One Score per text, in order."""
        ...


def score_items(classifier: Any, items: Sequence[Item]) -> list[Score]:
    """Score items with ``score_items`` when the backend has it, else ``score_batch`` on the texts."""
    if not items:
        return []
    method = getattr(classifier, "score_items", None)
    if method is not None:
        return list(method(items))
    return list(classifier.score_batch([i.text for i in items]))


def targets_of(classifier: Any) -> tuple[str, ...]:
    """Targets a classifier scores (``targets`` attribute; default all four)."""
    return tuple(getattr(classifier, "targets", None) or ("violation", "part1", "part2", "response"))
