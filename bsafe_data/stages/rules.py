"""Stage *rules*: the recipe's filter rules on the recorded scores of each live record.

The same ``RuleSet`` decides in ``refilter`` from stored rows, so changing a rule later gives what
a fresh build would. Duplicates are a dataset-wide pass of their own (``stages.dedupe``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bsafe_data.classify.rules import RuleSet, relabel_entry
from bsafe_data.stages.record import Record


def rule_view(record: Record) -> dict[str, Any]:
    """The fields of the future row that rules read."""
    injection = None
    if record.injection is not None:
        inj = record.injection
        injection = {
            "offset": inj.offset,
            "category": inj.category,
            "steering": inj.steering,
            "violation": inj.violation,
        }
    return {
        "kind": record.kind,
        "response": record.conv.response,
        "injection": injection,
        "backtrack": record.backtrack,
        "scores": record.scores,
    }


def apply_rules(rules: RuleSet, records: Sequence[Record]) -> None:
    """Add each live record's rule reasons; relabel its category when the mismatch rule says so."""
    for record in records:
        if not record.live:
            continue
        decision = rules.decide(rule_view(record))
        injection, category = record.injection, decision.category
        if injection is not None and category is not None and category != injection.category:
            record.scores.append(relabel_entry(injection.category, category))
            injection.category = category
        record.reasons.extend(decision.reasons)
