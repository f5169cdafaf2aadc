"""BSAFE+: inject a violation into a safe answer, then ``[CATEGORY c][BACKTRACK_BY_X]`` ⊕ the rest.

A row is ``part1 ⊕ steering ⊕ violation ⊕ control ⊕ part2`` where ``part1 ⊕ part2`` is the
original safe answer split at a sampled point, the violation is written by the generator to
continue ``part1``, and X is the exact number of tokens (per tokenizer) of steering ⊕ violation.
Clean rows (no injection) are mixed in at ``sampling.clean_fraction``. Per-row randomness comes from
(recipe seed, source row id, variant).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from bsafe_data.classify.base import Item, Score
from bsafe_data.classify.rules import RELABEL_CLASSIFIER, relabel_entry, requested_category
from bsafe_data.generate.base import GenerationRequest
from bsafe_data.label import control_text
from bsafe_data.methods.base import Method
from bsafe_data.recipe import ControlSpec, Recipe, SamplingSpec
from bsafe_data.sources import Conversation
from bsafe_data.stages import adjust
from bsafe_data.stages.record import Injection, Record
from bsafe_data.stages.sample import candidates, draw_position, pick_candidate, weighted_choice
from bsafe_data.stages.stats import ChunkStats

# Redraw a target position this many times when no candidate lies near it (short answers).
_POSITION_DRAWS = 8
_NEAR = 0.08


class BsafePlusRecipe(Recipe):
    """BSAFE+: inject a violation into a safe answer, then ``[CATEGORY c][BACKTRACK_BY_X]``."""

    method: Literal["bsafe_plus"] = "bsafe_plus"
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    control: ControlSpec = Field(default_factory=ControlSpec)

    @property
    def categories(self) -> list[str]:
        """The sampled categories, in recipe order."""
        return list(self.sampling.categories)


def sample_injection(
    rng: random.Random,
    conv: Conversation,
    spans: list[tuple[int, int]],
    sampling: SamplingSpec,
    start: bool = True,
) -> Injection:
    """An injection point drawn from ``sampling.positions`` (redrawn when no candidate lies near
    the target; not at the very start unless ``start``) and a category drawn from its weights."""
    options = candidates(conv.response, spans, sampling.word_boundaries, sampling.long_sentence_words)
    if not start:
        options = [c for c in options if c.offset > 0] or options
    length = len(conv.response)
    for _ in range(_POSITION_DRAWS):
        target = draw_position(rng, sampling.positions)
        choice = pick_candidate(options, length, target)
        if abs(choice.offset / length - target) <= _NEAR:
            break
    category = weighted_choice(rng, sampling.categories)
    return Injection(choice.offset, choice.sentence_index, category, choice.offset / length)


class BsafePlusMethod(Method):
    """Inject, label X for every tokenizer, classify, keep or reject."""

    name = "bsafe_plus"
    recipe_model = BsafePlusRecipe
    counts = frozenset({"categories", "positions", "backtrack"})
    row_order = "variant"
    recipe: BsafePlusRecipe

    def source_reason(self, conv: Conversation, spans: list[tuple[int, int]]) -> str | None:
        """``too_few_sentences`` for answers shorter than ``sampling.min_sentences``."""
        return "too_few_sentences" if len(spans) < self.recipe.sampling.min_sentences else None

    def plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[Record]:
        """``variants_per_answer`` records: clean, or an injection point and a category."""
        sampling = self.recipe.sampling
        split = self.split_of(conv.ref)
        key = self.source_key(conv)
        records = []
        for variant in range(sampling.variants_per_answer):
            seed = self.record_seed(conv, variant)
            rng = random.Random(seed)
            record = Record(conv, f"{key}/v{variant}", split, seed, "clean", spans)
            records.append(record)
            if rng.random() >= sampling.clean_fraction:
                record.kind = "injected"
                record.injection = sample_injection(rng, conv, spans, sampling)
        return records

    def request(self, record: Record) -> GenerationRequest | None:
        """Injected records need a violation."""
        return None if record.injection is None else self.generation_request(record)

    def on_judge(self, verdicts: list[tuple[Record, Item, Score]]) -> None:
        """Move injections back to where a judge says the violation starts; X again."""
        adjust.apply_judge_verdicts(self.tokenizers, verdicts)

    def build_row(self, record: Record) -> dict[str, Any]:
        """The row: segments, X per tokenizer and the primary tokenizer's prompt/completion."""
        injection = record.injection
        if injection is None:
            return self.clean_row(record)
        fields = {"kind": "injected", "generator": self.generator_column(record)}
        if record.reasons and (not record.backtrack or "token_boundary" in record.reasons):
            return self.injected_row(record, "", record.part2, rendered=False, **fields)
        return self.injected_row(record, self.control(record), record.part2, **fields)

    # -- dataset-level --------------------------------------------------------------------------
    @classmethod
    def plots(cls, out_dir: Path, stats: ChunkStats) -> list[str]:
        """Injection positions and categories of the kept rows."""
        from bsafe_data.plots import injection_plots

        return injection_plots(out_dir, stats)

    @classmethod
    def card_context(cls, recipe: Recipe, manifest: dict[str, Any], stats: ChunkStats) -> dict[str, Any]:
        """The control signal, its atoms, the clean share and the category table of the card."""
        assert isinstance(recipe, BsafePlusRecipe)
        tokens = manifest["control_tokens"]
        categories = recipe.categories
        x_atoms = [t for t in tokens if not any(c in t for c in categories)] or tokens
        cat_atoms = [t for t in tokens if t not in x_atoms] or tokens
        funnel = manifest["funnel"]
        return {
            "categories": sorted(stats.categories.items(), key=lambda kv: (-kv[1], kv[0])),
            "clean_pct": 100.0 * funnel["kept_by_kind"].get("clean", 0) / max(1, funnel["kept"]),
            "control_example": cls.control_example(recipe),
            "category_atom_example": cat_atoms[0] if cat_atoms else "",
            "first_x_atom": x_atoms[0] if x_atoms else "",
            "last_x_atom": x_atoms[-1] if x_atoms else "",
        }

    @classmethod
    def relabel(cls, recipe: Recipe, row: dict[str, Any], category: str) -> None:
        """Give a stored injected row another category: control segment, completion, and the
        ``bsafe:relabel`` marker in ``scores`` (so a later refilter can undo it)."""
        assert isinstance(recipe, BsafePlusRecipe)
        fmt = recipe.control.format
        inj = row["injection"]
        old = inj["category"]
        requested = requested_category(row)
        row["scores"] = [s for s in row["scores"] if s["classifier"] != RELABEL_CLASSIFIER]
        if category != requested:
            row["scores"].append(relabel_entry(requested, category))
        inj["category"] = category
        if not row["backtrack"]:
            return
        x = row["backtrack"][0]["tokens"]
        before, after = control_text(fmt, old, x), control_text(fmt, category, x)
        for seg in row["segments"]:
            if seg["kind"] == "control":
                seg["text"] = after
        if row["completion"].startswith(before):
            row["completion"] = after + row["completion"][len(before) :]
