"""Stage *rows*: records become rows of the row contract (``bsafe_data.rows``)."""

from __future__ import annotations

from typing import Any

from bsafe_data.label import clean_segments
from bsafe_data.rows import empty_row
from bsafe_data.sources import SourceItem
from bsafe_data.stages.record import Injection


def base_row(item: SourceItem, row_id: str) -> dict[str, Any]:
    """A row with identity, source reference, context and response filled in."""
    return empty_row(
        id=row_id,
        source=item.ref.as_dict(),
        context=[{"role": r, "content": c} for r, c in item.context],
        response=item.response,
    )


def rejected_row(row: dict[str, Any], reasons: list[str], detail: str = "") -> dict[str, Any]:
    """``row`` for the ``rejected`` config: the same columns plus ``reasons`` and ``detail``."""
    row["reasons"] = list(reasons)
    row["detail"] = detail
    return row


def clean_row(row: dict[str, Any], frame: tuple[str, str]) -> dict[str, Any]:
    """``row`` as a row without an injection: the whole answer trained on, framed by ``frame``
    (the chat template's head and tail)."""
    head, tail = frame
    row["segments"] = clean_segments(row["response"])
    row["prompt"], row["completion"] = head, row["response"] + tail
    return row


def injection_column(injection: Injection) -> dict[str, Any]:
    """The ``injection`` column of an injection."""
    return {
        "offset": injection.offset,
        "relative_position": injection.relative,
        "sentence_index": injection.sentence_index,
        "category": injection.category,
        "steering": injection.steering,
        "violation": injection.violation,
    }


def generator_column(generator: Any, seed: int, **override: Any) -> dict[str, Any]:
    """The ``generator`` column: backend, model and template of ``generator``, the row's seed;
    ``override`` replaces any of them (e.g. the template of a companion prompt)."""
    return {
        "backend": generator.backend,
        "model": generator.model,
        "template": generator.template,
        "seed": seed,
        **override,
    }
