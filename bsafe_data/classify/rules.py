"""Filter rules: pure functions from a row's recorded scores and spans to reason codes.

The build (``BsafePlusMethod._filter``) and ``refilter`` call the same code, so re-applying
changed rules to a built dataset gives exactly what a fresh build would. Nothing here calls a
classifier: a rule compares the recorded ``score`` with its threshold (the rule's, else the
classifier's in the recipe).

Order of the reasons a row gets (the first one is what the funnel counts):
``source_refusal``, ``classifier_error``, the shorthand rules (``source_unsafe`` from
``require_source_safe``, ``violation_not_flagged``, ``context_flagged``), the recipe's ``rules`` in
order, ``category_mismatch``, ``violation_too_short`` / ``violation_too_long``,
``violation_copies_context``; then, only for rows that pass everything else, duplicates
(``duplicate_violation``, ``near_duplicate_violation``), first in source order kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bsafe_data.classify.base import ERROR_LABEL, is_unsafe
from bsafe_data.classify.dedupe import DedupeIndex
from bsafe_data.classify.taxonomy import to_recipe
from bsafe_data.recipe import FilterSpec, RuleSpec

#: Reason codes that filter rules produce; ``refilter`` recomputes exactly these.
FILTER_REASONS: tuple[str, ...] = (
    "source_refusal",
    "classifier_error",
    "source_unsafe",
    "violation_not_flagged",
    "context_flagged",
    "category_mismatch",
    "violation_too_short",
    "violation_too_long",
    "violation_copies_context",
    "duplicate_violation",
    "near_duplicate_violation",
)
#: ``scores`` entry recording a relabelled category: categories = [requested, new].
RELABEL_CLASSIFIER = "bsafe:relabel"
_WORD = re.compile(r"[0-9a-z]+")
_TARGET_KINDS = {"violation": "injected", "part1": "injected", "part2": "injected"}


@dataclass
class Decision:
    """What the rules say about one row."""

    reasons: list[str] = field(default_factory=list)
    category: str | None = None  # the category the row should carry (relabel), None = unchanged


def requested_category(row: dict[str, Any]) -> str | None:
    """The category the generator was asked for (before any relabelling)."""
    for entry in row.get("scores") or []:
        if entry["classifier"] == RELABEL_CLASSIFIER and entry["categories"]:
            return entry["categories"][0]
    inj = row.get("injection")
    return inj["category"] if inj else None


def relabel_entry(requested: str, new: str) -> dict[str, Any]:
    """The ``scores`` entry recording a relabel (kept so ``refilter`` can undo it)."""
    return {
        "classifier": RELABEL_CLASSIFIER,
        "target": "violation",
        "label": "relabeled",
        "score": 1.0,
        "categories": [requested, new],
    }


def _ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def context_overlap(violation: str, context: str) -> float:
    """Share of the violation's word 3-grams that also occur in the context (0 when it has none)."""
    grams = _ngrams(violation)
    if not grams:
        return 0.0
    if len(next(iter(grams))) < 3:  # fewer than 3 words: copied if contained as a phrase
        phrase = " ".join(next(iter(grams)))
        return 1.0 if f" {phrase} " in f" {' '.join(_WORD.findall(context.lower()))} " else 0.0
    return len(grams & _ngrams(context)) / len(grams)


class RuleSet:
    """The recipe's filter rules, ready to apply to rows (dicts in the row-contract shape)."""

    def __init__(self, filters: FilterSpec, categories: Iterable[str], primary_tokenizer: str = ""):
        self.filters = filters
        self.categories = list(categories)
        self.primary = primary_tokenizer
        self.specs = {c.name: c for c in filters.classifiers}
        self.rules = self._rules()

    def _rules(self) -> list[RuleSpec]:
        f = self.filters
        rules = []
        if f.require_source_safe:
            rules.append(RuleSpec(target="response", verdict="safe", reason="source_unsafe"))
        if f.require_violation_flagged:
            rules.append(RuleSpec(target="violation", verdict="unsafe"))
        if f.require_context_safe:
            rules.append(RuleSpec(target="part1", verdict="safe", reason="context_flagged"))
            rules.append(RuleSpec(target="part2", verdict="safe", reason="context_flagged"))
            rules.append(
                RuleSpec(target="response", verdict="safe", kinds=["clean"], reason="context_flagged")
            )
        return rules + list(f.rules)

    def new_dedupe(self) -> DedupeIndex:
        """A fresh dataset-wide duplicate index for this recipe."""
        return DedupeIndex(self.filters.quality.dedupe)

    # -- per row --------------------------------------------------------------------------------
    def threshold(self, name: str, rule: RuleSpec | None = None) -> float:
        """The rule's threshold, else the classifier's."""
        if rule is not None and rule.threshold is not None:
            return rule.threshold
        return self.specs[name].threshold

    def _names(self, rule: RuleSpec) -> list[str]:
        if rule.classifiers:
            return list(rule.classifiers)
        return [n for n, s in self.specs.items() if rule.target in s.scored_targets]

    def decide(self, row: dict[str, Any]) -> Decision:
        """Reasons (in order) and the category the row should carry; duplicates are not checked here."""
        decision = Decision()
        if not self.filters.enabled:
            return decision
        reasons = decision.reasons
        kind = row["kind"]
        quality = self.filters.quality
        if quality.reject_source_refusals and _looks_like_refusal(row["response"]):
            reasons.append("source_refusal")
        scores = {
            (s["classifier"], s["target"]): s
            for s in row.get("scores") or []
            if s["classifier"] in self.specs
        }
        failed: list[str] = []
        for rule in self.rules:
            if rule.kinds is not None and kind not in rule.kinds:
                continue
            if _TARGET_KINDS.get(rule.target, kind) != kind:
                continue
            entries = [(n, scores[(n, rule.target)]) for n in self._names(rule) if (n, rule.target) in scores]
            if not entries:
                continue  # nothing scored this span (e.g. part1 of an injection at the start)
            if any(e["label"] == ERROR_LABEL for _, e in entries):
                failed.append("classifier_error")
                continue
            unsafe = [is_unsafe(e["score"], self.threshold(n, rule)) for n, e in entries]
            wanted = unsafe if rule.verdict == "unsafe" else [not u for u in unsafe]
            ok = any(wanted) if rule.combine_mode == "any" else all(wanted)
            if not ok:
                failed.append(rule.reason_code)
        if "classifier_error" in failed:
            reasons.append("classifier_error")
        reasons.extend(r for r in failed if r != "classifier_error")
        if kind == "injected" and row.get("injection"):
            self._category(row, scores, decision)
            self._quality(row, reasons)
        decision.reasons = list(dict.fromkeys(reasons))
        return decision

    def _category(self, row: dict[str, Any], scores: dict, decision: Decision) -> None:
        """Carry the requested category (undoing an earlier relabel), unless the mismatch rule says else."""
        requested = requested_category(row)
        decision.category = requested
        mode = self.filters.category_mismatch
        if mode == "keep" or requested is None:
            return
        mapped: list[str] = []
        for name in self.specs:
            entry = scores.get((name, "violation"))
            if entry is None or entry["label"] == ERROR_LABEL:
                continue
            if not is_unsafe(entry["score"], self.threshold(name)):
                continue
            for native in entry["categories"]:
                for cat in to_recipe(native, self.categories, self.filters.category_map):
                    if cat not in mapped:
                        mapped.append(cat)
        if not mapped or requested in mapped:
            return
        if mode == "reject":
            decision.reasons.append("category_mismatch")
        else:
            decision.category = mapped[0]

    def _quality(self, row: dict[str, Any], reasons: list[str]) -> None:
        quality = self.filters.quality
        inj = row["injection"]
        bounds = quality.violation_tokens
        if (bounds.min is not None or bounds.max is not None) and row.get("backtrack"):
            x = row["backtrack"][0]["tokens"]
            if bounds.min is not None and x < bounds.min:
                reasons.append("violation_too_short")
            if bounds.max is not None and x > bounds.max:
                reasons.append("violation_too_long")
        if quality.max_context_overlap is not None:
            offset = inj["offset"]
            response = row["response"]
            overlap = max(
                context_overlap(inj["violation"], response[:offset]),
                context_overlap(inj["violation"], response[offset:]),
            )
            if overlap > quality.max_context_overlap:
                reasons.append("violation_copies_context")


def _looks_like_refusal(text: str) -> bool:
    from bsafe_data.inject import looks_like_refusal

    return looks_like_refusal(text.lstrip())
