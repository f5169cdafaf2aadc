"""Stage *classify*: every classifier scores every target span of every live record.

Every score is kept (``Record.scores``, later the row's ``scores`` column); rules decide later.
``classify_steps`` gives the method's classification as steps of the flow: one step per classifier
that adjusts spans (LLM judges, in recipe order), whose verdict the method may react to
(``on_verdict``: move the injection point back, see ``adjust``), then one step for all the others,
which score the final spans. A record's requests to every classifier of a step go out together, as
soon as the record reaches it. Scores enter ``Record.scores`` in recipe order of the classifiers,
whatever order they ran in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bsafe_data.classify.base import ERROR_LABEL, Classifier, Item, Score, transient_error
from bsafe_data.stages.record import Record
from bsafe_data.stages.step import Step, Task

ItemsOf = Callable[[Record, Sequence[str]], list[Item]]
OnVerdict = Callable[[list[tuple[Record, Item, Score]]], None]


def classify_steps(
    classifiers: Sequence[Classifier], items_of: ItemsOf, on_verdict: OnVerdict | None = None
) -> list[Step]:
    """The flow's steps that score records with ``classifiers`` (none without classifiers)."""
    if not classifiers:
        return []
    judges = [i for i, c in enumerate(classifiers) if c.adjusts_spans]
    others = [i for i, c in enumerate(classifiers) if not c.adjusts_spans]
    groups = [([i], on_verdict) for i in judges] + [(others, None)]
    steps = []
    for n, (group, react) in enumerate(groups):
        last = n == len(groups) - 1
        steps.append(
            Step(
                "classify",
                ask=lambda record, group=group: _tasks(classifiers, group, items_of, record),
                apply=lambda record, scores, group=group, react=react, last=last: _take(
                    classifiers, group, items_of, record, scores, react, last
                ),
            )
        )
    return steps


def _pairs(
    classifiers: Sequence[Classifier], group: list[int], items_of: ItemsOf, record: Record
) -> list[tuple[int, Item]]:
    return [(i, item) for i in group for item in items_of(record, classifiers[i].targets)]


def _tasks(
    classifiers: Sequence[Classifier], group: list[int], items_of: ItemsOf, record: Record
) -> list[Task]:
    return [classifiers[i].task(item) for i, item in _pairs(classifiers, group, items_of, record)]


def _take(
    classifiers: Sequence[Classifier],
    group: list[int],
    items_of: ItemsOf,
    record: Record,
    scores: list[Any],
    react: OnVerdict | None,
    last: bool,
) -> None:
    if scores:  # the record was live: its items are the ones asked for (nothing moved since)
        pairs = _pairs(classifiers, group, items_of, record)
        for (index, item), score in zip(pairs, scores, strict=True):
            record.verdicts.append((index, item, score))
            if score.label == ERROR_LABEL:
                _note_error(record, classifiers[index].name, score)
        if react is not None:
            react([(record, item, score) for _, item, score in record.verdicts[-len(pairs) :]])
    if last:  # recipe order of classifiers, whatever order they ran in
        for _, item, score in sorted(record.verdicts, key=lambda v: v[0]):
            record.scores.append(score.as_dict(item.target))
        record.verdicts.clear()


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
