"""Stage *dedupe*: a dataset-wide pass over kept rows, in dataset order, after every other rule.

Chunks are independent of each other; this pass runs once over all of them (in ``build`` and in
``refilter`` alike) and names the rows whose violation duplicates one kept earlier.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bsafe_data.classify.dedupe import DedupeIndex


def find_duplicates(index: DedupeIndex, rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Row id → ``duplicate_violation`` / ``near_duplicate_violation`` for kept injected rows whose
    violation duplicates an earlier kept one (``rows`` in dataset order; the first one stays)."""
    found: dict[str, str] = {}
    if not index.active:
        return found
    for row in rows:
        if row.get("reasons") or row["kind"] != "injected" or not row.get("injection"):
            continue
        reason = index.check_and_add(row["injection"]["violation"])
        if reason:
            found[row["id"]] = reason
    return found
