"""The record every stage works on: one future dataset row, with its spans as the truth.

A method plans records from source conversations; the stages fill them in (generation, X per
tokenizer, scores, reasons) and the method finally turns each into a row of the row contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bsafe_data.sources import Conversation


@dataclass
class Injection:
    """Where the inserted text goes and what it is: ``response[:offset]`` ⊕ steering ⊕ violation."""

    offset: int
    sentence_index: int
    category: str
    relative: float = 0.0
    steering: str = ""
    violation: str = ""

    @property
    def inserted(self) -> str:
        """The text a backtrack deletes: steering ⊕ violation."""
        return self.steering + self.violation


@dataclass
class Record:
    """One row in the making. ``injection`` is None for rows without inserted text (clean rows)."""

    conv: Conversation
    row_id: str
    split: str
    seed: int
    kind: str
    spans: list[tuple[int, int]] = field(default_factory=list)  # sentence spans of the response
    injection: Injection | None = None
    reasons: list[str] = field(default_factory=list)
    detail: str = ""  # what went wrong, for the rejected config (never a secret, never row text)
    transient: bool = False  # failed for a reason a re-run may not hit (endpoint down, timeout)
    backtrack: list[dict[str, Any]] = field(default_factory=list)  # {tokenizer, tokens} per tokenizer
    scores: list[dict[str, Any]] = field(default_factory=list)
    frames: dict[str, tuple[str, str]] = field(default_factory=dict)  # tokenizer ref -> (head, tail)
    #: the token boundary was moved back once so that X counts exactly (``stages.count``)
    repaired: bool = False
    #: the row's ``generator`` column, when a model (or the bank) wrote part of the row
    generator: dict[str, Any] | None = None
    #: classifier verdicts not yet in ``scores``: (classifier index, item, score), see ``stages.classify``
    verdicts: list[tuple[int, Any, Any]] = field(default_factory=list)

    def reject(self, reason: str, detail: str = "", *, transient: bool = False) -> None:
        """Add a reason code (and the first detail); ``transient`` failures are retried next run."""
        self.reasons.append(reason)
        if detail and not self.detail:
            self.detail = detail
        self.transient = self.transient or transient

    @property
    def live(self) -> bool:
        """True while no stage has rejected the record."""
        return not self.reasons

    @property
    def part1(self) -> str:
        """The original answer before the injection point ('' without an injection)."""
        return self.conv.response[: self.injection.offset] if self.injection else ""

    @property
    def part2(self) -> str:
        """The original answer from the injection point on (the whole answer without one)."""
        return self.conv.response[self.injection.offset :] if self.injection else self.conv.response
