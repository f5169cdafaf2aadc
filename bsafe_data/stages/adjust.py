"""Stage *adjust spans*: move an injection point back to where a judge says the violation starts.

When a judge's violating span starts inside ``part1``, the injection point moves back to the
whitespace before that word: the moved text joins the steering, ``offset`` and the sentence index
follow, and X is counted again for every tokenizer, so ``[BACKTRACK_BY_X]`` deletes everything the
judge says must go. A span starting inside the steering is already covered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from bsafe_data.classify.base import Item, Score
from bsafe_data.stages import count
from bsafe_data.stages.record import Record

_LAST_WORD_END = re.compile(r"\S(?=\s+\S*$)")


def move_back(record: Record, start: int) -> bool:
    """Move the injection point back to ``start`` (snapped to the whitespace before its word).

    The moved text joins the steering. False when that would not move the point.
    """
    injection = record.injection
    response = record.conv.response
    old = injection.offset
    start = max(0, start)
    while start > 0 and not response[start - 1].isspace():
        start -= 1
    while start > 0 and response[start - 1].isspace():
        start -= 1
    if start >= old:
        return False
    injection.steering = response[start:old] + injection.steering
    spans = record.spans
    injection.sentence_index = next((i for i, (_, end) in enumerate(spans) if end > start), len(spans) - 1)
    injection.offset = start
    injection.relative = start / len(response)
    return True


def previous_word_end(record: Record) -> bool:
    """Move the injection point to the end of the word before it (the skipped text stays in part2).

    The repair step of the first X count; False when ``part1`` has no earlier word end.
    """
    injection = record.injection
    ends = [m.end() for m in _LAST_WORD_END.finditer(record.part1)]
    if not ends:
        return False
    injection.offset = ends[-1]
    injection.relative = injection.offset / len(record.conv.response)
    return True


def apply_judge_verdicts(
    tokenizers: Mapping[str, Any], verdicts: Sequence[tuple[Record, Item, Score]]
) -> None:
    """Move records whose judged violation starts before the inserted text, then recount X.

    A moved record that no tokenizer can count exactly gets one more step back to the previous
    word (joining the steering) and is otherwise rejected with ``token_boundary``.
    """
    moved = []
    for record, item, score in verdicts:
        start = score.detail.get("span_start")
        if (
            item.target == "violation"
            and score.label == "unsafe"
            and start is not None
            and start < 0
            and move_back(record, record.injection.offset + start)
        ):
            moved.append(record)

    def one_word_back(record: Record) -> bool:
        offset = record.injection.offset
        return offset > 0 and move_back(record, offset - 1)

    count.count_with_repair(tokenizers, moved, one_word_back)
