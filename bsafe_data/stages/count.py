"""Stage *count X*: the exact number of tokens a backtrack deletes, for every recipe tokenizer.

For each tokenizer, ``encode(head + part1)`` must be a prefix of ``encode(head + part1 + inserted)``
(``label.backtrack_counts``). Where a tokenizer merges across the boundary, the method moves the
boundary back to the previous whitespace once (``step_back``) and X is counted again; a record
that still fails is rejected with ``token_boundary``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bsafe_data.label import backtrack_counts, chat_frame
from bsafe_data.stages.record import Record
from bsafe_data.tokenization import short_name


def frame(tokenizers: Mapping[str, Any], records: Sequence[Record]) -> None:
    """Chat-template head and tail of every record, per tokenizer: rendered once per context (a
    pure function of it), so the variants of an answer share theirs."""
    for ref, tok in tokenizers.items():
        rendered: dict[tuple[tuple[str, str], ...], tuple[str, str]] = {}
        for record in records:
            context = record.conv.context
            found = rendered.get(context)
            if found is None:
                found = rendered[context] = chat_frame(tok, context)
            record.frames[ref] = found


def count(tokenizers: Mapping[str, Any], records: Sequence[Record]) -> list[Record]:
    """Fill each record's ``backtrack``; return the records some tokenizer cannot count exactly."""
    bad: set[int] = set()
    for record in records:
        record.backtrack = []
    for ref, tok in tokenizers.items():
        items = [(r.frames[ref][0], r.part1, r.injection.inserted) for r in records]
        for i, (record, x) in enumerate(zip(records, backtrack_counts(tok, items), strict=True)):
            if x is None:
                bad.add(i)
            else:
                record.backtrack.append({"tokenizer": short_name(ref), "tokens": x})
    return [records[i] for i in sorted(bad)]


def count_with_repair(
    tokenizers: Mapping[str, Any],
    records: Sequence[Record],
    step_back: Callable[[Record], bool],
) -> int:
    """Count X; records that fail get one ``step_back`` (move the boundary) and a recount.

    Records that cannot step back, or still fail, are rejected with ``token_boundary``; the
    others are marked ``repaired``. Returns how many records were repaired.
    """
    retry = []
    for record in count(tokenizers, records):
        if step_back(record):
            retry.append(record)
        else:
            record.reasons.append("token_boundary")
    failed = count(tokenizers, retry)
    for record in failed:
        record.reasons.append("token_boundary")
    still = {id(record) for record in failed}
    for record in retry:
        record.repaired = record.repaired or id(record) not in still
    return len(retry) - len(failed)
