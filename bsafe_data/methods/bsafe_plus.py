"""BSAFE+: turn a chunk of conversations into injected and clean rows (kept or rejected).

Pure apart from the generator call: given the recipe, the source rows and the generator's answers,
the rows are fully determined. Per-row randomness comes from (recipe seed, source row id, variant).
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bsafe_data.classify.base import Classifier, Item, score_items, targets_of
from bsafe_data.classify.rules import RuleSet, relabel_entry
from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.label import (
    backtrack_counts,
    chat_frame,
    clean_segments,
    control_text,
    segments_for,
)
from bsafe_data.recipe import Recipe
from bsafe_data.rows import empty_row
from bsafe_data.segment import (
    Candidate,
    candidates,
    draw_position,
    pick_candidate,
    row_seed,
    sentence_spans,
    weighted_choice,
)
from bsafe_data.sources import Conversation, SourceItem, SourceReject
from bsafe_data.tokenization import short_name

_LAST_WORD_END = re.compile(r"\S(?=\s+\S*$)")
# Redraw a target position this many times when no candidate lies near it (short answers).
_POSITION_DRAWS = 8
_NEAR = 0.08


@dataclass
class ChunkOutput:
    """What one chunk produced: kept rows per split, rejected rows, and counters."""

    kept: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"train": [], "test": []})
    rejected: list[dict[str, Any]] = field(default_factory=list)
    repaired: int = 0


@dataclass
class _Plan:
    conv: Conversation
    row_id: str
    split: str
    seed: int
    candidate: Candidate | None  # None = clean row
    category: str = ""
    relative: float = 0.0
    generation: Generation | None = None
    reasons: list[str] = field(default_factory=list)
    steering: str = ""
    violation: str = ""
    backtrack: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    frames: dict[str, tuple[str, str]] = field(default_factory=dict)


class BsafePlusMethod:
    """Everything the BSAFE+ method needs to turn source rows into dataset rows."""

    def __init__(
        self,
        recipe: Recipe,
        nlp: Any,
        tokenizers: dict[str, Any],
        generator: Generator,
        classifiers: Sequence[Classifier],
        multi_source: bool = False,
    ):
        self.recipe = recipe
        self.nlp = nlp
        self.tokenizers = tokenizers  # ref -> tokenizer, primary first
        self.primary = recipe.tokenizers.primary
        self.generator = generator
        self.classifiers = list(classifiers)
        self.multi_source = multi_source
        self.timings: Counter[str] = Counter()  # seconds per stage, summed over chunks

    # -- identities -----------------------------------------------------------------------------

    def _source_key(self, item: SourceItem) -> str:
        ref = item.ref
        return f"{ref.dataset}:{ref.id}" if self.multi_source else ref.id

    def split_of(self, item: SourceItem) -> str:
        """train/test by source row, so no answer appears in both splits."""
        ref = item.ref
        draw = random.Random(row_seed(self.recipe.seed, "split", ref.dataset, ref.id)).random()
        return "test" if draw < self.recipe.split.test_fraction else "train"

    # -- the chunk ------------------------------------------------------------------------------

    def process(self, items: Sequence[SourceItem]) -> ChunkOutput:
        """Turn source items into rows; every item ends up kept or rejected."""
        out = ChunkOutput()
        clock = time.perf_counter()
        plans = self._prepare(items, out)
        clock = self._tick("segment", clock)
        self._generate([p for p in plans if p.candidate is not None])
        clock = self._tick("generate", clock)
        self._label(plans, out)
        clock = self._tick("label", clock)
        self._classify(plans)
        self._filter(plans)
        clock = self._tick("classify", clock)
        for plan in plans:
            row = self._row(plan)
            if plan.reasons:
                row["reasons"] = plan.reasons
                out.rejected.append(row)
            else:
                out.kept[plan.split].append(row)
        return out

    def generation_requests(self, items: Sequence[SourceItem]) -> tuple[list[GenerationRequest], int]:
        """The generator requests a chunk would make, and how many rows it would reject before that."""
        out = ChunkOutput()
        plans = [p for p in self._prepare(items, out) if p.candidate is not None]
        return [self._request(p) for p in plans], len(out.rejected)

    def _prepare(self, items: Sequence[SourceItem], out: ChunkOutput) -> list[_Plan]:
        """Reject unusable source rows into ``out``; plan the variants of the others."""
        convs: list[Conversation] = []
        for item in items:
            if isinstance(item, SourceReject):
                out.rejected.append(self._source_rejected(item, [item.reason]))
            else:
                convs.append(item)
        spans = sentence_spans(self.nlp, [c.response for c in convs])
        plans: list[_Plan] = []
        for conv, conv_spans in zip(convs, spans, strict=True):
            if len(conv_spans) < self.recipe.sampling.min_sentences:
                out.rejected.append(self._source_rejected(conv, ["too_few_sentences"]))
                continue
            plans.extend(self._plan(conv, conv_spans))
        return plans

    def _tick(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] += now - since
        return now

    def _plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[_Plan]:
        sampling = self.recipe.sampling
        options = candidates(conv.response, spans, sampling.word_boundaries, sampling.long_sentence_words)
        length = len(conv.response)
        split = self.split_of(conv)
        key = self._source_key(conv)
        plans = []
        for variant in range(sampling.variants_per_answer):
            seed = row_seed(self.recipe.seed, conv.ref.dataset, conv.ref.id, variant)
            rng = random.Random(seed)
            row_id = f"{key}/v{variant}"
            if rng.random() < sampling.clean_fraction:
                plans.append(_Plan(conv, row_id, split, seed, None))
                continue
            for _ in range(_POSITION_DRAWS):
                target = draw_position(rng, sampling.positions)
                choice = pick_candidate(options, length, target)
                if abs(choice.offset / length - target) <= _NEAR:
                    break
            category = weighted_choice(rng, sampling.categories)
            plans.append(_Plan(conv, row_id, split, seed, choice, category, choice.offset / length))
        return plans

    @staticmethod
    def _request(plan: _Plan) -> GenerationRequest:
        part1 = plan.conv.response[: plan.candidate.offset]
        return GenerationRequest(plan.row_id, plan.conv.context, part1, plan.category, plan.seed)

    def _generate(self, plans: list[_Plan]) -> None:
        requests = [self._request(p) for p in plans]
        for plan, generation in zip(plans, self.generator.generate_batch(requests), strict=True):
            plan.generation = generation
            if generation.error:
                plan.reasons.append(generation.error)
            elif not generation.violation.strip():
                plan.reasons.append("empty_violation")
            else:
                plan.steering, plan.violation = generation.steering, generation.violation

    def _label(self, plans: list[_Plan], out: ChunkOutput) -> None:
        for plan in plans:
            for ref, tok in self.tokenizers.items():
                plan.frames[ref] = chat_frame(tok, plan.conv.context)
        todo = [p for p in plans if p.candidate is not None and not p.reasons]
        failed = self._count(todo)
        # Repair: move the boundary back to the previous whitespace, once; else reject.
        retry = []
        for plan in failed:
            part1 = plan.conv.response[: plan.candidate.offset]
            ends = [m.end() for m in _LAST_WORD_END.finditer(part1)]
            if not ends:
                plan.reasons.append("token_boundary")
                continue
            offset = ends[-1]
            plan.candidate = Candidate(offset, plan.candidate.sentence_index)
            plan.relative = offset / len(plan.conv.response)
            retry.append(plan)
        for plan in self._count(retry):
            plan.reasons.append("token_boundary")
        out.repaired += len(retry) - sum(1 for p in retry if "token_boundary" in p.reasons)

    def _count(self, plans: list[_Plan]) -> list[_Plan]:
        """Fill each plan's backtrack list; return the plans where some tokenizer breaks the invariant."""
        bad: set[int] = set()
        for plan in plans:
            plan.backtrack = []
        for ref, tok in self.tokenizers.items():
            items = [
                (p.frames[ref][0], p.conv.response[: p.candidate.offset], p.steering + p.violation)
                for p in plans
            ]
            for i, (plan, x) in enumerate(zip(plans, backtrack_counts(tok, items), strict=True)):
                if x is None:
                    bad.add(i)
                else:
                    plan.backtrack.append({"tokenizer": short_name(ref), "tokens": x})
        return [plans[i] for i in sorted(bad)]

    def _classify(self, plans: list[_Plan]) -> None:
        """Score every target span of every live row with every classifier (all scores are kept).

        Judges that adjust spans run first: when a judged violating span starts inside ``part1``,
        the injection point moves back to it (the moved text joins the steering) and X is counted
        again, so the backtrack covers everything the judge says must go. The other classifiers
        then score the final spans.
        """
        if not self.recipe.filters.enabled or not self.classifiers:
            return
        collected: list[list[tuple[_Plan, dict[str, Any]]]] = [[] for _ in self.classifiers]
        order = sorted(
            range(len(self.classifiers)),
            key=lambda i: not getattr(self.classifiers[i], "adjusts_spans", False),
        )
        for index in order:
            classifier = self.classifiers[index]
            pairs = self._classify_items([p for p in plans if not p.reasons], targets_of(classifier))
            unique = list(dict.fromkeys(item for _, item in pairs))
            by_item = dict(zip(unique, score_items(classifier, unique), strict=True))
            moved: list[_Plan] = []
            for plan, item in pairs:
                score = by_item[item]
                collected[index].append((plan, score.as_dict(item.target)))
                start = score.detail.get("span_start")
                if (
                    getattr(classifier, "adjusts_spans", False)
                    and item.target == "violation"
                    and score.label == "unsafe"
                    and start is not None
                    and start < 0
                    and self._move_back(plan, plan.candidate.offset + start)
                ):
                    moved.append(plan)
            self._recount(moved)
        for entries in collected:
            for plan, entry in entries:
                plan.scores.append(entry)

    def _classify_items(self, plans: list[_Plan], targets: Sequence[str]) -> list[tuple[_Plan, Item]]:
        """(plan, item) for every target span of every plan that the classifier scores."""
        pairs: list[tuple[_Plan, Item]] = []
        for plan in plans:
            response, context = plan.conv.response, plan.conv.context
            if plan.candidate is None:
                if "response" in targets:
                    pairs.append((plan, Item(response, "response", context)))
                continue
            offset = plan.candidate.offset
            inserted = plan.steering + plan.violation
            if "violation" in targets:
                item = Item(inserted.strip(), "violation", context, response[:offset], inserted)
                pairs.append((plan, item))
            if offset > 0 and "part1" in targets:
                pairs.append((plan, Item(response[:offset], "part1", context)))
            if "part2" in targets:
                pairs.append((plan, Item(response[offset:], "part2", context)))
            if "response" in targets:
                pairs.append((plan, Item(response, "response", context)))
        return pairs

    def _move_back(self, plan: _Plan, start: int) -> bool:
        """Move the injection point back to ``start`` (snapped to the whitespace before its word)."""
        response = plan.conv.response
        old = plan.candidate.offset
        start = max(0, start)
        while start > 0 and not response[start - 1].isspace():
            start -= 1
        while start > 0 and response[start - 1].isspace():
            start -= 1
        if start >= old:
            return False
        plan.steering = response[start:old] + plan.steering
        spans = sentence_spans(self.nlp, [response])[0]
        sentence = next((i for i, (_, end) in enumerate(spans) if end > start), len(spans) - 1)
        plan.candidate = Candidate(start, sentence)
        plan.relative = start / len(response)
        return True

    def _recount(self, plans: list[_Plan]) -> None:
        """X again for moved plans; one repair step back to the previous word, else token_boundary."""
        retry = []
        for plan in self._count(plans):
            if plan.candidate.offset > 0 and self._move_back(plan, plan.candidate.offset - 1):
                retry.append(plan)
            else:
                plan.reasons.append("token_boundary")
        for plan in self._count(retry):
            plan.reasons.append("token_boundary")

    def _filter(self, plans: list[_Plan]) -> None:
        """Apply the recipe's rules to the recorded scores (same code as ``refilter``)."""
        if not self.recipe.filters.enabled:
            return
        rules = self._rule_set()
        for plan in plans:
            if plan.reasons:
                continue
            view = self._rule_view(plan)
            decision = rules.decide(view)
            if decision.category is not None and decision.category != plan.category:
                plan.scores.append(relabel_entry(plan.category, decision.category))
                plan.category = decision.category
            plan.reasons.extend(decision.reasons)
            if not plan.reasons and plan.candidate is not None and self._dedupe.active:
                duplicate = self._dedupe.check_and_add(plan.violation)
                if duplicate:
                    plan.reasons.append(duplicate)

    def _rule_set(self) -> RuleSet:
        """The rules (built once); the duplicate index lives as long as the method (the whole build)."""
        if getattr(self, "_rules", None) is None:
            recipe = self.recipe
            self._rules = RuleSet(recipe.filters, list(recipe.sampling.categories), self.primary)
            self._dedupe = self._rules.new_dedupe()
        return self._rules

    @staticmethod
    def _rule_view(plan: _Plan) -> dict[str, Any]:
        """The fields of the future row that rules read."""
        injection = None
        if plan.candidate is not None:
            injection = {
                "offset": plan.candidate.offset,
                "category": plan.category,
                "steering": plan.steering,
                "violation": plan.violation,
            }
        return {
            "kind": "clean" if plan.candidate is None else "injected",
            "response": plan.conv.response,
            "injection": injection,
            "backtrack": plan.backtrack,
            "scores": plan.scores,
        }

    # -- rows -----------------------------------------------------------------------------------

    def _base(self, item: SourceItem, row_id: str) -> dict[str, Any]:
        return empty_row(
            id=row_id,
            source=item.ref.as_dict(),
            context=[{"role": r, "content": c} for r, c in item.context],
            response=item.response,
        )

    def _source_rejected(self, item: SourceItem, reasons: list[str]) -> dict[str, Any]:
        row = self._base(item, self._source_key(item))
        row["reasons"] = reasons
        return row

    def _row(self, plan: _Plan) -> dict[str, Any]:
        row = self._base(plan.conv, plan.row_id)
        response = plan.conv.response
        head, tail = plan.frames[self.primary]
        gen = self.generator
        row["scores"] = plan.scores
        if plan.candidate is None:
            row["segments"] = clean_segments(response)
            row["prompt"], row["completion"] = head, response + tail
            return row
        row["kind"] = "injected"
        row["generator"] = {
            "backend": gen.backend,
            "model": gen.model,
            "template": gen.template,
            "seed": plan.seed,
        }
        offset = plan.candidate.offset
        part1, part2 = response[:offset], response[offset:]
        row["injection"] = {
            "offset": offset,
            "relative_position": plan.relative,
            "sentence_index": plan.candidate.sentence_index,
            "category": plan.category,
            "steering": plan.steering,
            "violation": plan.violation,
        }
        if plan.reasons and (not plan.backtrack or "token_boundary" in plan.reasons):
            row["segments"] = segments_for(part1, plan.steering, plan.violation, "", part2)
            return row
        x = plan.backtrack[0]["tokens"]
        control = control_text(self.recipe.control.format, plan.category, x)
        row["backtrack"] = plan.backtrack
        row["segments"] = segments_for(part1, plan.steering, plan.violation, control, part2)
        row["prompt"] = head + part1 + plan.steering + plan.violation
        row["completion"] = control + part2 + tail
        return row
