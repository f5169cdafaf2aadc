"""Stage *classify*: every classifier scores every target span of every live record.

Every score is kept (``Record.scores``, later the row's ``scores`` column); rules decide later.
Classifiers that adjust spans (LLM judges) run first, and ``on_verdict`` lets the method react to
their verdict (move the injection point back, see ``adjust``) before the others score the final
spans. Identical spans are scored once per classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bsafe_data.classify.base import ERROR_LABEL, Classifier, Item, Score, score_items, transient_error
from bsafe_data.stages.record import Record

ItemsOf = Callable[[Record, Sequence[str]], list[Item]]
OnVerdict = Callable[[list[tuple[Record, Item, Score]]], None]


def classify(
    classifiers: Sequence[Classifier],
    records: Sequence[Record],
    items_of: ItemsOf,
    on_verdict: OnVerdict | None = None,
) -> None:
    """Score the live records' spans (``items_of(record, targets)``) with every classifier."""
    collected: list[list[tuple[Record, dict[str, Any]]]] = [[] for _ in classifiers]
    order = sorted(range(len(classifiers)), key=lambda i: not classifiers[i].adjusts_spans)
    for index in order:
        classifier = classifiers[index]
        pairs = [(r, item) for r in records if r.live for item in items_of(r, classifier.targets)]
        unique = list(dict.fromkeys(item for _, item in pairs))
        by_item = dict(zip(unique, score_items(classifier, unique), strict=True))
        verdicts = []
        for record, item in pairs:
            score = by_item[item]
            collected[index].append((record, score.as_dict(item.target)))
            verdicts.append((record, item, score))
            if score.label == ERROR_LABEL:
                _note_error(record, classifier.name, score)
        if classifier.adjusts_spans and on_verdict is not None:
            on_verdict(verdicts)
    for entries in collected:  # recipe order of classifiers, whatever order they ran in
        for record, entry in entries:
            record.scores.append(entry)


def _note_error(record: Record, name: str, score: Score) -> None:
    """Remember why a classifier call failed; a transient failure (``transient_error``) makes
    a re-run retry the row."""
    if not record.detail:
        record.detail = f"classifier {name}: {score.detail.get('error', '')}"[:300]
    if transient_error(score):
        record.transient = True


def span_items(record: Record, targets: Sequence[str]) -> list[Item]:
    """The spans of an injection record a classifier scores: violation, part1, part2, response.

    Records without an injection have only ``response``; ``part1`` is skipped when empty.
    """
    response, context = record.conv.response, record.conv.context
    injection = record.injection
    items: list[Item] = []
    if injection is None:
        if "response" in targets:
            items.append(Item(response, "response", context))
        return items
    offset, inserted = injection.offset, injection.inserted
    if "violation" in targets:
        items.append(Item(inserted.strip(), "violation", context, response[:offset], inserted))
    if offset > 0 and "part1" in targets:
        items.append(Item(response[:offset], "part1", context))
    if "part2" in targets:
        items.append(Item(response[offset:], "part2", context))
    if "response" in targets:
        items.append(Item(response, "response", context))
    return items
