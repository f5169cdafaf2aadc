"""The classifier interface: a batch of texts in, one Score per text out.

Every backend subclasses ``Classifier``. Simple backends implement ``score_batch(texts)``; backends
that read the conversation (guards, the LLM judge) implement ``score_items(items)``, where an
``Item`` carries the user turns and the answer text before the span. ``task(item)`` is what the
executor's flow runs: a local backend's item joins the batch of ``score_items``; an HTTP backend
(``classify.remote``) returns a coroutine for the engine.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bsafe_data.stages.step import Local, Task

#: Label of a score whose classifier call failed (rules reject the row with ``classifier_error``).
ERROR_LABEL = "error"
#: Every span a classifier can score.
ALL_TARGETS: tuple[str, ...] = ("violation", "part1", "part2", "response")


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


def transient_error(score: Score) -> bool:
    """Whether a re-run retries the row of this score: a call that failed in a way that may not
    recur (endpoint down, retries exhausted). Not an unparseable answer (the cache holds it) nor
    a request the endpoint refused (it would refuse it again)."""
    return score.label == ERROR_LABEL and bool(score.detail.get("transient"))


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


class Classifier(ABC):
    """A backend that scores spans. Subclasses implement ``score_items`` (or ``score_batch`` for
    backends that only read the span text) and may release resources in ``close``."""

    #: unique name recorded in the ``scores`` column
    name: str
    #: score at or above which a span is unsafe
    threshold: float = 0.5
    #: the targets (violation, part1, part2, response) this backend scores
    targets: tuple[str, ...] = ALL_TARGETS
    #: True for judges whose verdict may move the injection point back (they run first)
    adjusts_spans: bool = False
    #: True for backends whose verdicts come from an endpoint (``task`` is a coroutine)
    remote: bool = False
    #: True for backends that quote the violating span (``Score.detail["span_start"]``): BSAFE
    #: lets them read the whole answer instead of scoring it sentence by sentence
    locates_spans: bool = False

    def __init__(self) -> None:
        self.usage: dict[str, int] = {}

    def score_items(self, items: Sequence[Item]) -> list[Score]:
        """One Score per item, in order (default: ``score_batch`` on the span texts)."""
        return self.score_batch([i.text for i in items])

    def score_batch(self, texts: Sequence[str]) -> list[Score]:
        """One Score per bare text, in order (default: ``score_items`` without conversation)."""
        return self.score_items([Item(t) for t in texts])

    def task(self, item: Item) -> Task:
        """The flow's task for one item (default: an argument of ``score_items``)."""
        return Local(self.score_items, item)

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release connections, caches and models."""


def score_items(classifier: Classifier, items: Sequence[Item]) -> list[Score]:
    """``classifier.score_items`` with the empty batch short-cut."""
    if not items:
        return []
    return list(classifier.score_items(items))
