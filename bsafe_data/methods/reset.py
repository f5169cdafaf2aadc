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
from dataclasses import dataclass, replace
from typing import Any, Literal

import datasets
from pydantic import Field

from bsafe_data.generate.text import TextPrompt, Written
from bsafe_data.methods.companion import (
    CompanionMethod,
    CompanionRecipe,
    CompanionRecord,
    HarmfulSourceSpec,
    sample_prefix,
)
from bsafe_data.recipe import Recipe
from bsafe_data.rows import PREFERENCE_FEATURES, ROW_FEATURES
from bsafe_data.sources import Conversation
from bsafe_data.stages.record import Injection, Record

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


class ResetSpec(HarmfulSourceSpec):
    """Reset's own section: the harmful set, its safe answers and the reset token."""

    safe_column: str = Field("safe_response", description="column of the harmful source with the safe answer")
    reset_token: str = Field(RESET_TOKEN, pattern=r"^\[[A-Za-z_]+\]$", description="the control atom")


class ResetRecipe(CompanionRecipe):
    """Reset backtracking: SFT rows with ``[RESET]`` after an unsafe prefix, and DPO pairs."""

    companion_section = "reset"
    method: Literal["reset"] = "reset"
    reset: ResetSpec


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


@dataclass
class ResetRecord(CompanionRecord):
    """A harmful record with the rest of the unsafe answer after its prefix."""

    unsafe_continuation: str = ""


class ResetMethod(CompanionMethod):
    """Unsafe prefix → ``[RESET]`` ⊕ safe answer; safe prompts answered directly; DPO pairs."""

    name = "reset"
    recipe_model = ResetRecipe
    features = RESET_FEATURES
    extra_configs = {"preference": PREFERENCE_FEATURES}
    counts = frozenset({"positions", "backtrack"})
    companion_prompt, companion_column = SAFE_PROMPT, "safe_column"
    companion_ask = "Write the assistant's safe answer."
    recipe: ResetRecipe

    def plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[Record]:
        """One record per conversation: a reset after a sampled unsafe prefix (once the safe answer
        is known), or a clean answer."""
        if not self.is_harmful(conv):
            return [self.new_record(conv, "clean", spans)]
        split = self.split_of(conv.ref)
        seed = self.record_seed(conv, 0)
        record = ResetRecord(conv, self.source_key(conv), split, seed, "injected", harmful=conv.response)
        self.start_harmful(record)
        return [record]

    def with_companion(self, record: CompanionRecord, text: str, written: Written | None = None) -> None:
        """Cut the unsafe answer once the safe answer is known."""
        assert isinstance(record, ResetRecord)
        record.conv = replace(record.conv, response=text)
        record.needs_companion = False
        if written is not None:
            if written.error:
                record.reject(written.error, written.detail, transient=written.transient)
                return
            record.generator = self.generator_column(record, template=SAFE_PROMPT.protocol)
        cut = sample_prefix(self.tokenizers[self.primary], record.harmful, random.Random(record.seed))
        if cut is None:
            record.reject("harmful_too_short", "no clean token cut point inside the unsafe answer")
            return
        k, n, prefix = cut
        record.injection = Injection(0, 0, "", k / n, "", prefix)
        record.unsafe_continuation = record.harmful[len(prefix) :]

    def step_back(self, record: Record) -> bool:
        """The prefix is a clean token cut: no repair."""
        return False

    def build_row(self, record: Record) -> dict[str, Any]:
        """Segments, X and the primary tokenizer's prompt/completion."""
        unsafe = record.unsafe_continuation if isinstance(record, ResetRecord) else ""
        fields = {"kind": record.kind, "generator": record.generator, "unsafe_continuation": unsafe}
        if record.injection is None:
            return self.clean_row(record, **fields)
        control = self.recipe.reset.reset_token if record.backtrack else ""
        return self.injected_row(record, control, record.conv.response, **fields)

    @classmethod
    def extra_rows(cls, row: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """The row's DPO pair (config ``preference``)."""
        return {"preference": preference_pairs(row, reset_token_of(row))}

    @classmethod
    def control_format(cls, recipe: Recipe) -> str | None:
        """The reset atom: the one control token (``control_format`` for ``bsafe_data.tokenize``)."""
        assert isinstance(recipe, ResetRecipe)
        return recipe.reset.reset_token

    @classmethod
    def card_context(cls, recipe: Recipe, manifest: dict[str, Any], stats: Any) -> dict[str, Any]:
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
