"""The classifier interface: a batch of texts in, one Score per text out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Score:
    """One classifier verdict on one text; stored in the row's ``scores`` column."""

    classifier: str
    label: str  # "unsafe" | "safe"
    score: float  # probability-like, higher = more unsafe
    categories: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self, target: str) -> dict:
        """The ``scores`` struct for ``target`` (violation, part1, part2, response)."""
        return {
            "classifier": self.classifier,
            "target": target,
            "label": self.label,
            "score": float(self.score),
            "categories": list(self.categories),
        }


class Classifier(Protocol):
    """A backend that scores texts."""

    name: str

    def score_batch(self, texts: Sequence[str]) -> list[Score]:
        """One Score per text, in order."""
        ...
