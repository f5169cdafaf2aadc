"""Counters of a chunk, updated as rows are emitted (``count`` / ``observe``), and the funnel.

Saved next to each finished chunk, so a resumed build adds up finished chunks without re-reading
their rows; ``merge_stats`` adds chunks in order and ``funnel_of`` gives what the manifest records.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

_COUNTERS = ("kept", "rejected_by_reason", "reason_hits", "kinds", "categories")


@dataclass
class ChunkStats:
    """Counters of one chunk (or of a whole build, after ``merge_stats``)."""

    source_rows: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # per split
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)  # first reason
    reason_hits: dict[str, int] = field(default_factory=dict)  # every reason
    kinds: dict[str, int] = field(default_factory=dict)  # kept rows per kind
    categories: dict[str, int] = field(default_factory=dict)  # kept rows per category
    positions: list[float] = field(default_factory=list)  # relative positions of kept injections
    backtrack: dict[str, list[int]] = field(default_factory=dict)  # tokenizer -> X of kept rows
    repaired: int = 0  # boundaries moved to whitespace so that X is exact
    transient: int = 0  # rows rejected for a reason a re-run retries (the chunk is not final)

    def count(self, name: str, key: str | None = None, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (to its entry ``key`` for per-key counters)."""
        if key is None:
            setattr(self, name, getattr(self, name) + n)
        else:
            table = getattr(self, name)
            table[key] = table.get(key, 0) + n

    def observe(self, name: str, value: Any, key: str | None = None) -> None:
        """Record one value of distribution ``name`` (per ``key`` for per-key distributions)."""
        values = getattr(self, name) if key is None else getattr(self, name).setdefault(key, [])
        values.append(value)

    def emitted(self, row: dict[str, Any], split: str | None) -> None:
        """Count a finished row: kept in ``split``, or rejected (``split`` None) with its reasons."""
        if split is None:
            self.rejected += 1
            self.count("rejected_by_reason", row["reasons"][0])
            for reason in row["reasons"]:
                self.count("reason_hits", reason)
        else:
            self.count("kept", split)
            self.count("kinds", row["kind"])

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``ChunkStats(**d)`` reads it back)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def merge_stats(parts: list[ChunkStats]) -> ChunkStats:
    """Add up chunk counters in chunk order."""
    total = ChunkStats()
    for part in parts:
        total.source_rows += part.source_rows
        total.rejected += part.rejected
        total.repaired += part.repaired
        total.transient += part.transient
        total.positions.extend(part.positions)
        for attr in _COUNTERS:
            merged = Counter(getattr(total, attr))
            merged.update(getattr(part, attr))
            setattr(total, attr, dict(merged))
        for name, values in part.backtrack.items():
            total.backtrack.setdefault(name, []).extend(values)
    return total


def funnel_of(stats: ChunkStats) -> dict[str, Any]:
    """The manifest funnel: rows in = kept + rejected, rejections by first reason."""
    kept = sum(stats.kept.values())
    return {
        "source_rows": stats.source_rows,
        "rows": kept + stats.rejected,
        "kept": kept,
        "rejected": stats.rejected,
        "rejected_by_reason": dict(sorted(stats.rejected_by_reason.items())),
        "reason_hits": dict(sorted(stats.reason_hits.items())),
        "kept_by_kind": dict(sorted(stats.kinds.items())),
        "repaired_boundaries": stats.repaired,
    }
