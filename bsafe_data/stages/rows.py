"""Stage *rows*: records become rows of the row contract (``bsafe_data.rows``)."""

from __future__ import annotations

from typing import Any

from bsafe_data.rows import empty_row
from bsafe_data.sources import SourceItem


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
