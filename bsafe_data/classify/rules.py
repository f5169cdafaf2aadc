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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
        kind = row["kind"]
        refusal = self.filters.quality.reject_source_refusals and _looks_like_refusal(row["response"])
        scores = {
            (s["classifier"], s["target"]): s
            for s in row.get("scores") or []
            if s["classifier"] in self.specs
        }
        failed: list[str] = []
        for rule in self.rules:
            if not _applies(rule, kind):
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
        later: list[str] = []
        if kind == "injected" and row.get("injection"):
            decision.category, mismatch = self._category(row, scores)
            later.extend(["category_mismatch"] if mismatch else [])
            later.extend(self._quality(row))
        decision.reasons = _ordered_reasons(refusal, failed, later)
        return decision

    def _category(self, row: dict[str, Any], scores: dict) -> tuple[str | None, bool]:
        """(category the row carries, category mismatch?): the requested one (undoing an earlier
        relabel), unless the mismatch rule says else."""
        requested = requested_category(row)
        mode = self.filters.category_mismatch
        if mode == "keep" or requested is None:
            return requested, False
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
            return requested, False
        if mode == "reject":
            return requested, True
        return mapped[0], False

    def _quality(self, row: dict[str, Any]) -> list[str]:
        reasons = []
        quality = self.filters.quality
        inj = row["injection"]
        bounds = quality.violation_tokens
        if (bounds.min is not None or bounds.max is not None) and row.get("backtrack"):
            x = row["backtrack"][0]["tokens"]
            if bounds.min is not None and x < bounds.min:
                reasons.append("violation_too_short")
            if bounds.max is not None and x > bounds.max:
                reasons.append("violation_too_long")
        if (
            quality.max_context_overlap is not None
            and _overlap(inj, row["response"]) > quality.max_context_overlap
        ):
            reasons.append("violation_copies_context")
        return reasons

    # -- over a table ---------------------------------------------------------------------------
    def decide_table(self, table: pa.Table, rows: np.ndarray | None = None) -> TableDecisions:
        """``decide`` for rows ``rows`` (default: all) of an Arrow table in the row-contract shape.

        Columnar: every input ``decide`` reads is reduced to a per-row signature (kind, refusal,
        injection present, its category and relabel markers, per (classifier, target) whether the
        score is missing, an error, or at or above each threshold a rule compares it with,
        the flagged categories, X, the context overlap verdict); ``decide`` itself runs once per
        distinct signature, on a real row that has it (``examples``; it also has the row's
        ``requested_category``). So the rules keep one definition; a new input of ``decide`` must
        join the signature (``tests/test_refilter.py`` compares both on generated rows and rules).
        """
        from bsafe_data.columnar import gather, signature_groups

        n = table.num_rows if rows is None else len(rows)
        rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        columns = self._signature(table, rows)
        groups, reps = signature_groups(columns, n)
        examples = gather(table, rows[reps]).to_pylist() if n else []
        return TableDecisions(groups, [self.decide(row) for row in examples], examples)

    def _signature(self, table: pa.Table, rows: np.ndarray) -> dict[str, Any]:
        """The columns of ``decide``'s inputs for ``rows`` (see ``decide_table``)."""
        import polars as pl  # here: the build imports this module and never needs polars

        from bsafe_data.columnar import (
            join_lists,
            list_entries,
            struct_field,
            taken,
            unique_map,
        )

        quality, mode = self.filters.quality, self.filters.category_mismatch
        injection = taken(table.column("injection"), rows)
        entries = list_entries(taken(table.column("scores"), rows))  # r, classifier, target, label, score
        marks = entries.filter(entries["classifier"] == RELABEL_CLASSIFIER)
        out: dict[str, Any] = {  # what requested_category reads, for every row
            "injection": injection.is_valid(),
            "category": struct_field(injection, "category"),
            "marks": join_lists(marks, len(rows)),
        }
        if not self.filters.enabled:
            return out
        kind = out["kind"] = taken(table.column("kind"), rows)
        if quality.reject_source_refusals:
            out["refusal"] = unique_map(table.column("response"), _looks_like_refusal)[rows]
        spec = entries.filter(entries["classifier"].is_in(list(self.specs)))

        def scored(name: str, target: str) -> Any:  # the entry decide's dict keeps: the last one
            pair = spec.filter((spec["classifier"] == name) & (spec["target"] == target))
            r = pair["r"].to_numpy()
            return pair.filter(pl.Series(np.append(r[1:] != r[:-1], True))) if len(r) else pair

        for (name, target), thresholds in self._compared().items():
            out[f"{name}\x1f{target}"] = _states(scored(name, target), thresholds, len(rows))
        if mode != "keep":
            for name in self.specs:
                pair = scored(name, "violation")
                flagged = _states(pair, [self.threshold(name)], len(rows)) == 3
                cats = join_lists(pair.select("r", "categories"), len(rows), column="categories")
                out[f"{name}\x1fcategories"] = np.where(flagged, cats, None)
        bounds = quality.violation_tokens
        if bounds.min is not None or bounds.max is not None:
            backtrack = list_entries(taken(table.column("backtrack"), rows))
            r = backtrack["r"].to_numpy()
            first = backtrack.filter(pl.Series(np.insert(r[1:] != r[:-1], 0, True))) if len(r) else backtrack
            x = np.zeros(len(rows), dtype=np.int64)
            x[first["r"].to_numpy()] = first["tokens"].to_numpy()
            present = np.zeros(len(rows), dtype=bool)  # no backtrack: never checked
            present[first["r"].to_numpy()] = True
            out["x"] = pl.Series(x).set(pl.Series(~present), None)
        if quality.max_context_overlap is not None:
            out["copies"] = self._copies(table, rows, kind, injection)
        return out

    def _compared(self) -> dict[tuple[str, str], list[float]]:
        """(classifier, target) -> the thresholds rules compare its score with."""
        compared: dict[tuple[str, str], list[float]] = {}
        for rule in self.rules:
            for name in self._names(rule):
                if name in self.specs:
                    found = compared.setdefault((name, rule.target), [])
                    if self.threshold(name, rule) not in found:
                        found.append(self.threshold(name, rule))
        return compared

    def _copies(self, table: pa.Table, rows: np.ndarray, kind: Any, injection: Any) -> list[bool | None]:
        """Whether each injected row's violation copies its context (None: not checked)."""
        from bsafe_data.columnar import gather

        limit = self.filters.quality.max_context_overlap
        injected = np.asarray(pc.equal(kind, "injected").fill_null(False)) & np.asarray(injection.is_valid())
        wanted = np.flatnonzero(injected)
        out: list[bool | None] = [None] * len(rows)
        if len(wanted):
            sub = gather(table.select(["injection", "response"]), rows[wanted])
            pairs = zip(sub.column("injection").to_pylist(), sub.column("response").to_pylist(), strict=True)
            for i, (inj, response) in zip(wanted.tolist(), pairs, strict=True):
                out[i] = _overlap(inj, response) > limit
        return out


@dataclass
class TableDecisions:
    """``RuleSet.decide_table``: row i (of the rows asked for) gets ``decisions[groups[i]]``;
    ``examples[g]`` is the row ``decisions[g]`` was decided on."""

    groups: np.ndarray
    decisions: list[Decision]
    examples: list[dict[str, Any]]


def _applies(rule: RuleSpec, kind: str) -> bool:
    """Whether ``rule`` checks rows of ``kind`` (its kinds, and injected-only targets)."""
    if rule.kinds is not None and kind not in rule.kinds:
        return False
    return _TARGET_KINDS.get(rule.target, kind) == kind


def _ordered_reasons(refusal: bool, failed: list[str], later: list[str]) -> list[str]:
    """The documented reason order, each reason once: refusal, classifier_error, the failed rules
    in order, then category and quality reasons."""
    reasons = ["source_refusal"] if refusal else []
    if "classifier_error" in failed:
        reasons.append("classifier_error")
    reasons.extend(r for r in failed if r != "classifier_error")
    return list(dict.fromkeys(reasons + later))


def _overlap(inj: dict[str, Any], response: str) -> float:
    """The violation's word 3-gram overlap with the answer before or after it (the larger)."""
    offset = inj["offset"]
    return max(
        context_overlap(inj["violation"], response[:offset]),
        context_overlap(inj["violation"], response[offset:]),
    )


def _states(pair: Any, thresholds: list[float], n: int) -> np.ndarray:
    """Per row, one (classifier, target) score: 0 missing, 1 error, else 2 + a bit per threshold
    the score is at or above (``is_unsafe``: float32 comparison)."""
    import polars as pl

    state = np.zeros(n, dtype=np.int64)
    if pair.height:
        code = pl.lit(0, dtype=pl.Int64)
        for bit, threshold in enumerate(thresholds):
            at_or_above = pl.col("score") >= pl.lit(np.float32(threshold), dtype=pl.Float32)
            code = code + at_or_above.cast(pl.Int64) * (1 << bit)
        values = pair.select(pl.when(pl.col("label") == ERROR_LABEL).then(1).otherwise(code + 2))
        state[pair["r"].to_numpy()] = values.to_series().to_numpy()
    return state


def _looks_like_refusal(text: str) -> bool:
    from bsafe_data.inject import looks_like_refusal

    return looks_like_refusal(text.lstrip())
