"""Reset backtracking (Zhang et al. 2024, arXiv 2409.14586): ``[RESET]`` discards an unsafe start.

SFT rows (config ``default``):

* ``injected``: harmful prompt ⊕ a prefix of the unsafe answer (cut at a clean token boundary, k
  uniform over 1 … n-1 primary tokens) → ``[RESET]`` ⊕ the safe answer; loss on ``[RESET]`` and the
  safe answer. Stored like a BSAFE+ row with the unsafe prefix injected at offset 0 of the safe
  answer (``response``), so ``bsafe_data.tokenize(row, tok, control_format="[RESET]")`` and
  ``rerender`` give any tokenizer's ids and labels; ``backtrack`` is the prefix length per tokenizer
  (what the reset discards). ``unsafe_continuation`` holds the rest of the unsafe answer.
* ``clean``: safe prompts (the other sources) answered without a reset; the mix ratio is what the
  sources' ``limit`` give.

DPO pairs (config ``preference``, TRL's standard preference format, derived from each kept row by
``extra_rows``): after an unsafe prefix, chosen = ``[RESET]`` ⊕ safe answer, rejected = the unsafe
continuation; on safe prompts, chosen = the safe answer, rejected = ``[RESET]`` ⊕ the safe answer (a
needless reset). ``[RESET]`` is the one control atom (``control_vocabulary``): add it as a special
token so it is a single token for every tokenizer.

Missing safe answers: offline (the builtin generator) a harmful row without one is rejected
``missing_companion``; with ``generator.provider: openai`` the generator writes it (``generate.text``,
protocol ``reset/safe_response/1``, cached; failures as in DeRTa: ``generator_error`` is transient).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from typing import Any, Literal

import datasets
from pydantic import Field, model_validator

from bsafe_data.classify.base import Item
from bsafe_data.generate.text import TextPrompt, TextWriter, Written, render_conversation
from bsafe_data.label import clean_segments, segments_for
from bsafe_data.methods.base import ChunkOutput, Method, register_method
from bsafe_data.methods.derta import (
    PENDING,
    checked_text,
    companion_texts,
    companion_writer,
    sample_prefix,
    write_pending,
)
from bsafe_data.recipe import Recipe, Strict
from bsafe_data.rows import PREFERENCE_FEATURES, ROW_FEATURES
from bsafe_data.sources import Conversation, SourceItem
from bsafe_data.stages import count
from bsafe_data.stages.record import Injection, Record
from bsafe_data.stages.rows import base_row
from bsafe_data.stages.stats import ChunkStats

RESET_TOKEN = "[RESET]"
#: The default config's columns: the row contract plus the rest of the unsafe answer.
RESET_FEATURES = datasets.Features({**ROW_FEATURES, "unsafe_continuation": datasets.Value("string")})
#: How the generator writes a missing safe answer (``generate.text``); the protocol is part of the cache key.
SAFE_PROMPT = TextPrompt(
    "reset/safe_response/1",
    "You write the assistant's safe reply to a request that may be harmful: decline what would cause "
    "harm, help with what is safe, stay respectful and on topic, with no insults, no personal data "
    "and no risky advice. Reply with the answer text only.",
)


class ResetSpec(Strict):
    """Reset's own section: the harmful set, its safe answers and the reset token."""

    harmful_source: str = Field(
        ..., description="name (path or hf id) of the source with the harmful prompts and unsafe answers"
    )
    safe_column: str = Field("safe_response", description="column of the harmful source with the safe answer")
    reset_token: str = Field(RESET_TOKEN, pattern=r"^\[[A-Za-z_]+\]$", description="the control atom")


class ResetRecipe(Recipe):
    """Reset backtracking: SFT rows with ``[RESET]`` after an unsafe prefix, and DPO pairs."""

    method: Literal["reset"] = "reset"
    reset: ResetSpec

    @model_validator(mode="after")
    def _harmful_source_known(self) -> ResetRecipe:
        names = [s.name for s in self.sources]
        if self.reset.harmful_source not in names:
            raise ValueError(f"reset.harmful_source {self.reset.harmful_source!r} is not a source ({names})")
        return self


def reset_token_of(row: dict[str, Any]) -> str:
    """The reset atom of a stored row (its control segment; the default for rows without one)."""
    return next((s["text"] for s in row["segments"] if s["kind"] == "control"), RESET_TOKEN)


def preference_pairs(row: dict[str, Any], reset_token: str) -> list[dict[str, Any]]:
    """The DPO pair of a kept row (prompt and continuations rendered with the primary tokenizer)."""
    response, completion = row["response"], row["completion"]
    if row["kind"] == "injected":
        tail = completion[len(reset_token) + len(response) :]
        pair = ("unsafe", completion, row["unsafe_continuation"] + tail)
    else:
        pair = ("safe", completion, reset_token + completion)
    kind, chosen, rejected = pair
    return [
        {
            "id": f"{row['id']}/pref",
            "row_id": row["id"],
            "kind": kind,
            "prompt": row["prompt"],
            "chosen": chosen,
            "rejected": rejected,
        }
    ]


@register_method
class ResetMethod(Method):
    """Unsafe prefix → ``[RESET]`` ⊕ safe answer; safe prompts answered directly; DPO pairs."""

    name = "reset"
    recipe_model = ResetRecipe
    kinds = ("injected", "clean")
    loss_segments = ("control", "continuation")
    features = RESET_FEATURES
    extra_configs = {"preference": PREFERENCE_FEATURES}
    recipe: ResetRecipe

    def __init__(self, recipe: Recipe, resources: Any):
        super().__init__(recipe, resources)
        self._continuations: dict[str, str] = {}  # row id -> rest of the unsafe answer, until its row
        self._written: set[str] = set()  # row ids whose safe answer the generator wrote, until their row

    @cached_property
    def safe_answers(self) -> dict[str, str]:
        """Safe answer by harmful source row id."""
        spec = self.recipe.reset
        return companion_texts(self.recipe.sources, spec.harmful_source, spec.safe_column)

    @cached_property
    def writer(self) -> TextWriter | None:
        """The safe-answer writer (None offline: missing safe answers are ``missing_companion``)."""
        return companion_writer(self, SAFE_PROMPT)

    def _harmful(self, conv: Conversation) -> bool:
        return conv.ref.dataset == self.recipe.reset.harmful_source

    def source_reason(self, conv: Conversation, spans: list[tuple[int, int]]) -> str | None:
        """``missing_companion`` for harmful prompts without a safe answer (offline only)."""
        if self._harmful(conv) and not self.safe_answers.get(conv.ref.id, "").strip() and self.writer is None:
            return "missing_companion"
        return None

    def prepare(self, items: Sequence[SourceItem], out: ChunkOutput) -> list[Record]:
        """Plan the chunk; then write the missing safe answers and plan those harmful rows."""
        records = super().prepare(items, out)
        if self.writer is None:
            return records

        def message(conv: Conversation) -> str:
            return f"{render_conversation(conv.context)}\n\nWrite the assistant's safe answer."

        def replan(conv: Conversation, written: Written) -> list[Record]:
            written = checked_text(written, self.recipe.limits, self._controls)
            return [self._plan_harmful(conv, written.text, written)]

        records, made = write_pending(records, self.writer, message, replan)
        self._breaker(made)
        return records

    def plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[Record]:
        """One record per conversation: a reset after a sampled unsafe prefix, or a clean answer (a
        ``PENDING`` placeholder while the generator has the safe answer to write)."""
        key = self.source_key(conv)
        split = self.split_of(conv.ref.dataset, conv.ref.id)
        seed = self.record_seed(conv, 0)
        if not self._harmful(conv):
            return [Record(conv, key, split, seed, "clean", spans)]
        safe = self.safe_answers.get(conv.ref.id, "")
        if not safe.strip():
            return [Record(conv, key, split, seed, PENDING)]
        return [self._plan_harmful(conv, safe)]

    def _plan_harmful(self, conv: Conversation, safe: str, written: Written | None = None) -> Record:
        """The ``injected`` record of a harmful row with its safe answer (``written``: the generator's
        answer, whose error, if any, rejects the record)."""
        key = self.source_key(conv)
        split = self.split_of(conv.ref.dataset, conv.ref.id)
        seed = self.record_seed(conv, 0)
        unsafe = conv.response
        record = Record(replace(conv, response=safe), key, split, seed, "injected")
        if written is not None:
            if written.error:
                record.reject(written.error, written.detail, transient=written.transient)
                return record
            self._written.add(record.row_id)
        cut = sample_prefix(self.tokenizers[self.primary], unsafe, random.Random(seed))
        if cut is None:
            record.reject("harmful_too_short", "no clean token cut point inside the unsafe answer")
            return record
        k, n, prefix = cut
        record.injection = Injection(0, 0, "", k / n, "", prefix)
        self._continuations[record.row_id] = unsafe[len(prefix) :]
        return record

    def label(self, records: list[Record]) -> int:
        """Chat frames; X (tokens the reset discards) of the unsafe prefix for every tokenizer."""
        count.frame(self.tokenizers, records)
        todo = [r for r in records if r.injection is not None and r.live]
        return count.count_with_repair(self.tokenizers, todo, lambda record: False)

    def items_of(self, record: Record, targets: Sequence[str]) -> list[Item]:
        """The safe answer (``response``) and the unsafe prefix (``violation``)."""
        context = record.conv.context
        items = []
        if "response" in targets:
            items.append(Item(record.conv.response, "response", context))
        injection = record.injection
        if "violation" in targets and injection is not None and injection.violation.strip():
            items.append(Item(injection.violation.strip(), "violation", context, "", injection.violation))
        return items

    def build_row(self, record: Record) -> dict[str, Any]:
        """Segments, X and the primary tokenizer's prompt/completion."""
        row = base_row(record.conv, record.row_id)
        head, tail = record.frames.get(self.primary, ("", ""))
        row["scores"] = record.scores
        row["unsafe_continuation"] = self._continuations.pop(record.row_id, "")
        if record.row_id in self._written:
            self._written.discard(record.row_id)
            generator = self.resources.generator
            row["generator"] = {"backend": generator.backend, "model": generator.model,
                                "template": SAFE_PROMPT.protocol, "seed": record.seed}  # fmt: skip
        response = record.conv.response
        injection = record.injection
        row["kind"] = record.kind
        if injection is None:
            row["segments"] = clean_segments(response)
            row["prompt"], row["completion"] = head, response + tail
            return row
        token = self.recipe.reset.reset_token
        row["injection"] = {
            "offset": 0,
            "relative_position": injection.relative,
            "sentence_index": 0,
            "category": "",
            "steering": "",
            "violation": injection.violation,
        }
        row["backtrack"] = record.backtrack
        control = token if record.backtrack else ""
        row["segments"] = segments_for("", "", injection.violation, control, response)
        row["prompt"] = head + injection.violation
        row["completion"] = control + response + tail
        return row

    @classmethod
    def extra_rows(cls, row: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """The row's DPO pair (config ``preference``)."""
        return {"preference": preference_pairs(row, reset_token_of(row))}

    @classmethod
    def count_row(cls, stats: ChunkStats, row: dict[str, Any]) -> None:
        """Relative prefix lengths and X of kept reset rows."""
        if row["kind"] != "injected":
            return
        stats.observe("positions", round(float(row["injection"]["relative_position"]), 4))
        for entry in row["backtrack"]:
            stats.observe("backtrack", entry["tokens"], entry["tokenizer"])

    @classmethod
    def control_patterns(cls, recipe: Recipe) -> list[str]:
        """The reset atom must not occur in source text."""
        assert isinstance(recipe, ResetRecipe)
        return [re.escape(recipe.reset.reset_token)]

    @classmethod
    def control_vocabulary(cls, recipe: Recipe, max_x: dict[str, int]) -> list[str]:
        """``[RESET]``: the one special token a trainer adds."""
        assert isinstance(recipe, ResetRecipe)
        return [recipe.reset.reset_token]

    @classmethod
    def manifest_fields(cls, recipe: Recipe) -> dict[str, Any]:
        """The reset atom (``control_format`` for ``bsafe_data.tokenize`` / ``rerender``)."""
        assert isinstance(recipe, ResetRecipe)
        return {"control_format": recipe.reset.reset_token}

    @classmethod
    def card_context(cls, recipe: Recipe, manifest: dict[str, Any], stats: ChunkStats) -> dict[str, Any]:
        """The reset token, kind shares and the preference pair count."""
        assert isinstance(recipe, ResetRecipe)
        funnel = manifest["funnel"]
        kinds = funnel.get("kept_by_kind", {})
        return {
            "reset_token": recipe.reset.reset_token,
            "reset_rows": kinds.get("injected", 0),
            "safe_rows": kinds.get("clean", 0),
            "preference_rows": sum(manifest["counts"].get("preference", {}).values()),
        }
