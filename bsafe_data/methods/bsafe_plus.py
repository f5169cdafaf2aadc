"""BSAFE+: inject a violation into a safe answer, then ``[CATEGORY c][BACKTRACK_BY_X]`` ⊕ the rest.

A row is ``part1 ⊕ steering ⊕ violation ⊕ control ⊕ part2`` where ``part1 ⊕ part2`` is the
original safe answer split at a sampled point, the violation is written by the generator to
continue ``part1``, and X is the exact number of tokens (per tokenizer) of steering ⊕ violation.
Clean rows (no injection) are mixed in at ``sampling.clean_fraction``. Per-row randomness comes from
(recipe seed, source row id, variant).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from bsafe_data.classify.base import Item, Score
from bsafe_data.classify.rules import RELABEL_CLASSIFIER, relabel_entry, requested_category
from bsafe_data.generate.base import Generation, GenerationRequest
from bsafe_data.label import (
    clean_segments,
    control_patterns,
    control_text,
    control_vocabulary,
    segments_for,
)
from bsafe_data.methods.base import Method, register_method
from bsafe_data.recipe import BsafePlusRecipe, Recipe
from bsafe_data.sources import Conversation
from bsafe_data.stages import adjust, count
from bsafe_data.stages.record import Injection, Record
from bsafe_data.stages.rows import base_row
from bsafe_data.stages.sample import candidates, draw_position, pick_candidate, weighted_choice
from bsafe_data.stages.stats import ChunkStats

# Redraw a target position this many times when no candidate lies near it (short answers).
_POSITION_DRAWS = 8
_NEAR = 0.08
_VARIANT = re.compile(r"/v(\d+)$")


@register_method
class BsafePlusMethod(Method):
    """Inject, label X for every tokenizer, classify, keep or reject."""

    name = "bsafe_plus"
    recipe_model = BsafePlusRecipe
    kinds = ("injected", "clean")
    loss_segments = ("control", "continuation")
    recipe: BsafePlusRecipe

    # -- plan -----------------------------------------------------------------------------------
    def source_reason(self, conv: Conversation, spans: list[tuple[int, int]]) -> str | None:
        """``too_few_sentences`` for answers shorter than ``sampling.min_sentences``."""
        return "too_few_sentences" if len(spans) < self.recipe.sampling.min_sentences else None

    def plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[Record]:
        """``variants_per_answer`` records: clean, or an injection point and a category."""
        sampling = self.recipe.sampling
        options = candidates(conv.response, spans, sampling.word_boundaries, sampling.long_sentence_words)
        length = len(conv.response)
        split = self.split_of(conv.ref.dataset, conv.ref.id)
        key = self.source_key(conv)
        records = []
        for variant in range(sampling.variants_per_answer):
            seed = self.record_seed(conv, variant)
            rng = random.Random(seed)
            record = Record(conv, f"{key}/v{variant}", split, seed, "clean", spans)
            records.append(record)
            if rng.random() < sampling.clean_fraction:
                continue
            for _ in range(_POSITION_DRAWS):
                target = draw_position(rng, sampling.positions)
                choice = pick_candidate(options, length, target)
                if abs(choice.offset / length - target) <= _NEAR:
                    break
            category = weighted_choice(rng, sampling.categories)
            record.kind = "injected"
            relative = choice.offset / length
            record.injection = Injection(choice.offset, choice.sentence_index, category, relative)
        return records

    # -- generate -------------------------------------------------------------------------------
    def needs_generation(self, record: Record) -> bool:
        """Injected records need a violation."""
        return record.injection is not None

    def request(self, record: Record) -> GenerationRequest:
        """A violation of the record's category that continues ``part1``."""
        injection = record.injection
        return GenerationRequest(
            record.row_id, record.conv.context, record.part1, injection.category, record.seed
        )

    def apply_generation(self, record: Record, generation: Generation) -> None:
        """Steering and violation as the generator wrote them."""
        record.injection.steering, record.injection.violation = generation.steering, generation.violation

    # -- label and adjust -----------------------------------------------------------------------
    def label(self, records: list[Record]) -> int:
        """X for every tokenizer; a merging boundary moves back one word once, else token_boundary."""
        count.frame(self.tokenizers, records)
        todo = [r for r in records if r.injection is not None and r.live]
        return count.count_with_repair(self.tokenizers, todo, adjust.previous_word_end)

    def on_judge(self, verdicts: list[tuple[Record, Item, Score]]) -> None:
        """Move injections back to where a judge says the violation starts; X again."""
        adjust.apply_judge_verdicts(self.tokenizers, verdicts)

    # -- rows -----------------------------------------------------------------------------------
    def build_row(self, record: Record) -> dict[str, Any]:
        """The row: segments, X per tokenizer and the primary tokenizer's prompt/completion."""
        row = base_row(record.conv, record.row_id)
        response = record.conv.response
        head, tail = record.frames[self.primary]
        row["scores"] = record.scores
        injection = record.injection
        if injection is None:
            row["segments"] = clean_segments(response)
            row["prompt"], row["completion"] = head, response + tail
            return row
        generator = self.resources.generator
        row["kind"] = "injected"
        row["generator"] = {
            "backend": generator.backend,
            "model": generator.model,
            "template": generator.template,
            "seed": record.seed,
        }
        part1, part2 = record.part1, record.part2
        row["injection"] = {
            "offset": injection.offset,
            "relative_position": injection.relative,
            "sentence_index": injection.sentence_index,
            "category": injection.category,
            "steering": injection.steering,
            "violation": injection.violation,
        }
        if record.reasons and (not record.backtrack or "token_boundary" in record.reasons):
            row["segments"] = segments_for(part1, injection.steering, injection.violation, "", part2)
            return row
        x = record.backtrack[0]["tokens"]
        control = control_text(self.recipe.control.format, injection.category, x)
        row["backtrack"] = record.backtrack
        row["segments"] = segments_for(part1, injection.steering, injection.violation, control, part2)
        row["prompt"] = head + part1 + injection.inserted
        row["completion"] = control + part2 + tail
        return row

    @classmethod
    def count_row(cls, stats: ChunkStats, row: dict[str, Any]) -> None:
        """Categories, injection positions and X of kept injected rows."""
        injection = row["injection"]
        if not injection:
            return
        stats.count("categories", injection["category"])
        stats.observe("positions", round(float(injection["relative_position"]), 4))
        for entry in row["backtrack"]:
            stats.observe("backtrack", entry["tokens"], entry["tokenizer"])

    # -- dataset-level --------------------------------------------------------------------------
    @classmethod
    def plots(cls, out_dir: Path, stats: ChunkStats) -> list[str]:
        """Injection positions and categories of the kept rows."""
        from bsafe_data.plots import injection_plots

        return injection_plots(out_dir, stats)

    @classmethod
    def control_patterns(cls, recipe: Recipe) -> list[str]:
        """Each atom of the control format, with any category and any number."""
        assert isinstance(recipe, BsafePlusRecipe)
        return control_patterns(recipe.control.format)

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
            "control_example": recipe.control.format.format(category="c", x="X"),
            "category_atom_example": cat_atoms[0] if cat_atoms else "",
            "first_x_atom": x_atoms[0] if x_atoms else "",
            "last_x_atom": x_atoms[-1] if x_atoms else "",
        }

    @classmethod
    def manifest_fields(cls, recipe: Recipe) -> dict[str, Any]:
        """The control format the rows were rendered with."""
        assert isinstance(recipe, BsafePlusRecipe)
        return {"control_format": recipe.control.format}

    @classmethod
    def control_vocabulary(cls, recipe: Recipe, max_x: dict[str, int]) -> list[str]:
        """Every control atom the dataset can contain, for every recorded tokenizer: each
        category's atoms and X from 1 to the largest X any tokenizer needs."""
        assert isinstance(recipe, BsafePlusRecipe)
        return control_vocabulary(recipe.control.format, recipe.categories, max(max_x.values(), default=1))

    @classmethod
    def order_key(cls, row: dict[str, Any], position: int) -> tuple[Any, ...]:
        """Rejected source rows first, then by source position and variant (``…/vN`` ids)."""
        match = _VARIANT.search(row["id"])
        source_level = not row["segments"]
        variant = int(match.group(1)) if match and not source_level else -1
        return (0 if source_level else 1, position, variant)

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
