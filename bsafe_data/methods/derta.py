"""DeRTa (Yuan et al. 2024, arXiv 2407.09121): decoupled refusal training.

Three row kinds, from a harmful set (harmful prompt, harmful answer, refusal) and helpful chats:

* ``harmful_prefix`` (MLE with a harmful response prefix): prompt ⊕ the first k tokens of the
  harmful answer → the refusal, loss on the refusal only. k is uniform over 1 … n-1 (n = the harmful
  answer's length in the PRIMARY tokenizer's tokens) among the cut points that are clean token
  boundaries (``decode(ids[:k])`` is a prefix of the answer: no partial characters); a share
  ``derta.zero_prefix_fraction`` of the rows has k = 0 (prompt → refusal).
* ``refusal_token`` (RTO): prompt ⊕ the full harmful answer, the transition token (first token of
  ``derta.transition``, default "Sorry") the target at every harmful-answer position
  (``rto_labels``; ``derta.rto_keep_fraction`` < 1 drops positions at random, as the authors'
  code drops 5%). ``prompt`` holds the chat head ⊕ the harmful answer and ``completion`` is empty:
  these rows are not next-token SFT rows.
* ``helpful``: the helpful conversations of the other sources, unchanged (loss on the answer); the
  mix ratio is what the sources' ``limit`` give.

The harmful set is the source named ``derta.harmful_source``; its mapping's ``response`` is the
harmful answer, and the refusal is its column ``derta.refusal_column`` (read with the same source
spec, keyed by source row id). The refusal is each harmful row's ``response`` (the safe answer);
the harmful text is ``injection.violation`` (offset 0). ``export_derta`` writes the authors' training
layout (``prefix``/``text``/``safe`` records of their ``generate_training_data.py``).

Missing refusals: offline (the builtin generator) a harmful row without one is rejected
``missing_companion``. With ``generator.provider: openai`` the generator writes it (``generate.text``,
prompt: the conversation; protocol ``derta/refusal/1``; answers cached): one request per harmful row
without a refusal, before its cut is sampled. A failed request rejects the row's records
``generator_error`` (transient: a re-run retries them, unless the endpoint refused that very
request), ``generator_refused`` /
``generator_unparseable``; written text passes the generated-text checks (length, control strings).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import Field

from bsafe_data.generate.text import TextPrompt, Written
from bsafe_data.label import Rendered, RenderError, chat_frame, clean_segments, tokenize_rendered
from bsafe_data.methods.companion import (
    CompanionMethod,
    CompanionRecipe,
    CompanionRecord,
    HarmfulSourceSpec,
    cut_points,
    sample_prefix,
)
from bsafe_data.recipe import Recipe
from bsafe_data.sources import Conversation
from bsafe_data.stages import count
from bsafe_data.stages.record import Injection, Record
from bsafe_data.stages.rows import injection_column
from bsafe_data.stages.sample import row_seed
from bsafe_data.stages.stats import ChunkStats

#: Golden-ratio step of the low-discrepancy sequence that picks the k = 0 rows (an exact share).
_GOLDEN = 0.6180339887498949
#: The authors' prompt template and end-of-text marker (``generate_training_data.py``).
AUTHORS_TEMPLATE = "[INST] {} [\\INST]"
AUTHORS_EOS = "<|end_of_text|>"
#: How the generator writes a missing refusal (``generate.text``); the protocol is part of the cache key.
REFUSAL_PROMPT = TextPrompt(
    "derta/refusal/1",
    "You write the assistant's reply to a request it must not help with: a brief, polite refusal "
    "that gives no help with the request and may point to a safe alternative, with no insults, no "
    "personal data and no risky advice. Reply with the refusal text only.",
)


class DertaSpec(HarmfulSourceSpec):
    """DeRTa's own section: where the harmful set is and how rows are cut."""

    refusal_column: str = Field("refusal", description="column of the harmful source with the refusal")
    zero_prefix_fraction: float = Field(
        1 / 3, ge=0, le=1, description="share of harmful_prefix rows with k = 0 (the authors: 1/3)"
    )
    prefix_variants: int = Field(1, ge=1, le=16, description="harmful_prefix rows per harmful prompt")
    rto: bool = Field(True, description="also write a refusal_token (RTO) row per harmful prompt")
    transition: str = Field("Sorry", min_length=1, description="its first token is the RTO target")
    rto_keep_fraction: float = Field(
        1.0, gt=0, le=1, description="share of harmful positions rto_labels keeps (the authors: 0.95)"
    )


class DertaRecipe(CompanionRecipe):
    """DeRTa: MLE with a harmful response prefix, reinforced transition optimisation, helpful mix."""

    companion_section = "derta"
    method: Literal["derta"] = "derta"
    derta: DertaSpec


def prefix_length(tokenizer: Any, text: str, prefix: str) -> tuple[int, int]:
    """(k, n) of a stored harmful prefix: which cut of ``text`` (primary tokens) it is."""
    ids, n = cut_points(tokenizer, text)
    if not prefix:
        return 0, n
    for k in range(1, n + 1):
        if tokenizer.decode(ids[:k], clean_up_tokenization_spaces=False) == prefix:
            return k, n
    raise ValueError("the prefix is not a token cut of the text for this tokenizer")


def zero_prefix(index: int, variant: int, variants: int, fraction: float) -> bool:
    """True for the rows with k = 0: a golden-ratio sequence over (source index, variant), so the
    share is ``fraction`` within O(log N / N) on any N consecutive rows (not a coin flip per row)."""
    return ((index * variants + variant) * _GOLDEN + 0.5) % 1.0 < fraction


def transition_id(tokenizer: Any, transition: str = "Sorry") -> int:
    """The RTO target: the first token of ``transition``."""
    return int(tokenizer.encode(transition, add_special_tokens=False)[0])


def rto_labels(
    row: dict[str, Any],
    tokenizer: Any,
    transition: str = "Sorry",
    keep_fraction: float = 1.0,
    seed: int = 0,
) -> dict[str, list[int]]:
    """``input_ids``/``attention_mask``/``labels`` of a ``refusal_token`` row for ``tokenizer``.

    ``input_ids`` = encode(chat head ⊕ harmful answer); ``labels`` is the transition token id at
    every harmful-answer position and -100 elsewhere (with ``keep_fraction`` < 1, each position is
    kept with that probability, seeded by (seed, row id)). Raises RenderError (``prompt_boundary``)
    when the head's tokens are not a prefix of the full sequence's.
    """
    if row["kind"] != "refusal_token" or not row.get("injection"):
        raise ValueError(f"row {row['id']!r} is not a refusal_token row")
    head, _ = chat_frame(tokenizer, row["context"])
    harmful = row["injection"]["violation"]
    head_ids = list(tokenizer(head)["input_ids"])
    enc = tokenizer(head + harmful)
    ids = list(enc["input_ids"])
    n = len(head_ids)
    if ids[:n] != head_ids:
        raise RenderError("prompt_boundary: the head's tokens are not a prefix", reason="prompt_boundary")
    target = transition_id(tokenizer, transition)
    rng = random.Random(row_seed(seed, row["id"]))
    tail = [target if keep_fraction >= 1 or rng.random() < keep_fraction else -100 for _ in ids[n:]]
    return {"input_ids": ids, "attention_mask": list(enc["attention_mask"]), "labels": [-100] * n + tail}


def prefix_labels(row: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
    """``input_ids``/``attention_mask``/``labels`` of a ``harmful_prefix`` or ``helpful`` row for any
    tokenizer, as TRL's SFTTrainer makes them: the prompt (chat head ⊕ harmful prefix) has -100, the
    refusal (or helpful answer) and the end-of-turn token are trained on. (``bsafe_data.tokenize``
    renders only BSAFE+ kinds: it would drop the harmful prefix.)"""
    if row["kind"] == "refusal_token":
        raise ValueError(f"row {row['id']!r} is a refusal_token row: use rto_labels")
    head, tail = chat_frame(tokenizer, row["context"])
    prefix = row["injection"]["violation"] if row["injection"] else ""
    return tokenize_rendered(Rendered(head + prefix, row["response"] + tail, None), tokenizer)


class DertaMethod(CompanionMethod):
    """Harmful-prefix MLE rows, RTO rows and helpful rows; no control tokens (the generator only
    writes missing refusals)."""

    name = "derta"
    recipe_model = DertaRecipe
    kinds = ("harmful_prefix", "refusal_token", "helpful")
    loss_segments = ("continuation", "violation")  # violation: only in RTO rows (transition target)
    counts = None
    companion_prompt, companion_column = REFUSAL_PROMPT, "refusal_column"
    companion_ask = "Write the assistant's refusal."
    recipe: DertaRecipe

    def plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[Record]:
        """Helpful: one row. Harmful: ``prefix_variants`` harmful_prefix rows and one RTO row (their
        cuts wait for the refusal when the generator has it to write)."""
        if not self.is_harmful(conv):
            return [self.new_record(conv, "helpful", spans)]
        key = self.source_key(conv)
        split = self.split_of(conv.ref)
        spec = self.recipe.derta
        names = [(f"{key}/v{v}", "harmful_prefix") for v in range(spec.prefix_variants)]
        names += [(f"{key}/rto", "refusal_token")] if spec.rto else []
        records = [
            CompanionRecord(conv, row_id, split, self.record_seed(conv, n), kind, harmful=conv.response)
            for n, (row_id, kind) in enumerate(names)
        ]
        for record in records:
            self.start_harmful(record)
        return list(records)

    def with_companion(self, record: CompanionRecord, text: str, written: Written | None = None) -> None:
        """Cut a harmful record once its refusal is known."""
        record.conv = replace(record.conv, response=text)  # the row's safe answer
        record.needs_companion = False
        failed = written is not None and written.error
        if written is not None and not failed:
            record.generator = self.generator_column(record, template=REFUSAL_PROMPT.protocol)
        if record.kind == "refusal_token":
            record.injection = Injection(0, 0, "", 1.0, "", record.harmful)
        elif not failed:
            self._cut(record, text)
        if written is not None and written.error:
            record.reject(written.error, written.detail, transient=written.transient)

    def _cut(self, record: CompanionRecord, refusal: str) -> None:
        spec = self.recipe.derta
        variant = int(record.row_id.rsplit("/v", 1)[1])
        if zero_prefix(record.conv.ref.index, variant, spec.prefix_variants, spec.zero_prefix_fraction):
            return
        tokenizer = self.tokenizers[self.primary]
        cut = sample_prefix(tokenizer, record.harmful, random.Random(record.seed), follow=refusal)
        if cut is None:
            record.reject("harmful_too_short", "no clean token cut point inside the harmful answer")
            return
        k, n, prefix = cut
        record.injection = Injection(0, 0, "", k / n, "", prefix)

    def label(self, records: list[Record]) -> None:
        """Chat frames; ``token_boundary`` when a tokenizer merges the harmful prefix with the refusal
        (the prompt's tokens would not be a prefix of the row's, and TRL would move the border)."""
        count.frame(self.tokenizers, records)
        for record in records:
            if record.kind != "harmful_prefix" or record.injection is None or not record.live:
                continue
            for ref, tokenizer in self.tokenizers.items():
                head, tail = record.frames[ref]
                prompt = head + record.injection.violation
                alone = list(tokenizer(prompt)["input_ids"])
                full = list(tokenizer(prompt + record.conv.response + tail)["input_ids"])
                if full[: len(alone)] != alone:
                    record.reject("token_boundary", f"{ref} merges the harmful prefix with the refusal")
                    break

    def build_row(self, record: Record) -> dict[str, Any]:
        """Segments and the primary tokenizer's prompt/completion of each kind."""
        head, tail = self.frame(record)
        row = self.row(record, kind=record.kind, generator=record.generator)
        injection = record.injection
        if injection is not None:
            row["injection"] = injection_column(injection)
        harmful = injection.violation if injection else ""
        if record.kind == "refusal_token":
            row["segments"] = [{"kind": "violation", "text": harmful, "loss": True}]
            row["prompt"], row["completion"] = head + harmful, ""
            return row
        segments = [{"kind": "violation", "text": harmful, "loss": False}] if harmful else []
        row["segments"] = segments + clean_segments(record.conv.response)
        row["prompt"], row["completion"] = head + harmful, record.conv.response + tail
        return row

    @classmethod
    def count_row(cls, stats: ChunkStats, row: dict[str, Any]) -> None:
        """Relative prefix lengths k/n of kept harmful_prefix rows (0 for k = 0)."""
        if row["kind"] == "harmful_prefix":
            injection = row["injection"]
            stats.observe("positions", round(float(injection["relative_position"]) if injection else 0.0, 4))

    @classmethod
    def card_context(cls, recipe: Recipe, manifest: dict[str, Any], stats: ChunkStats) -> dict[str, Any]:
        """Kind shares, the k = 0 share and the recipe's DeRTa settings."""
        assert isinstance(recipe, DertaRecipe)
        kinds = manifest["funnel"].get("kept_by_kind", {})
        prefixes = stats.positions
        return {
            "derta": recipe.derta,
            "kind_counts": {k: kinds.get(k, 0) for k in cls.kinds},
            "zero_prefix_pct": 100.0 * sum(1 for p in prefixes if p == 0) / max(1, len(prefixes)),
        }

    @classmethod
    def manifest_fields(cls, recipe: Recipe) -> dict[str, Any]:
        """The RTO settings a trainer needs (``rto_labels`` arguments)."""
        assert isinstance(recipe, DertaRecipe)
        spec = recipe.derta
        return {"derta": {"transition": spec.transition, "rto_keep_fraction": spec.rto_keep_fraction}}


def _question(row: dict[str, Any]) -> str:
    users = [turn["content"] for turn in row["context"] if turn["role"] == "user"]
    return users[-1] if users else ""


def derta_record(row: dict[str, Any], style: Literal["authors", "chat"] = "authors") -> dict[str, str]:
    """One training record in the authors' layout: ``prefix`` (no loss), ``text``, ``safe``.

    ``safe`` is the string "true" for RTO rows (refusal-token prediction on ``text``) and "false"
    for next-token rows, as in their ``generate_training_data.py``. ``authors`` renders their
    Llama-3 base template (``[INST] q [\\INST]``, ``" " + text + "<|end_of_text|>"``; the last user
    turn only); ``chat`` keeps the row's own prompt/completion (recipe's primary chat template).
    """
    kind = row["kind"]
    harmful = row["injection"]["violation"] if row["injection"] else ""
    if style == "chat":
        if kind == "refusal_token":
            head = row["prompt"][: len(row["prompt"]) - len(harmful)]
            return {"prefix": head, "text": harmful, "safe": "true"}
        return {"prefix": row["prompt"], "text": row["completion"], "safe": "false"}
    question = AUTHORS_TEMPLATE.format(_question(row))
    if kind == "refusal_token":
        return {"prefix": question, "text": " " + harmful + AUTHORS_EOS, "safe": "true"}
    if kind == "harmful_prefix":
        question += " " + harmful  # the authors: prefix ⊕ " " ⊕ the first words ('' for k = 0)
    return {"prefix": question, "text": " " + row["response"] + AUTHORS_EOS, "safe": "false"}


def export_derta(
    folder: str | Path, path: str | Path, split: str = "train", style: Literal["authors", "chat"] = "authors"
) -> int:
    """Write the kept rows of a DeRTa dataset folder as JSON lines in the authors' layout; row count."""
    folder, path = Path(folder), Path(path)
    shards = sorted((folder / "data").glob(f"{split}-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{folder}/data has no {split} shards")
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for shard in shards:
            for row in pq.read_table(shard).to_pylist():
                out.write(json.dumps(derta_record(row, style), ensure_ascii=False) + "\n")
                count += 1
    return count
