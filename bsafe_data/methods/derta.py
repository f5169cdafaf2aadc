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
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import Field, model_validator

from bsafe_data.classify.base import Item
from bsafe_data.generate.text import TextPrompt, TextWriter, Written, render_conversation
from bsafe_data.label import Rendered, RenderError, chat_frame, clean_segments, tokenize_rendered
from bsafe_data.methods.base import ChunkOutput, Method, register_method
from bsafe_data.recipe import LimitsSpec, Recipe, SourceSpec, Strict
from bsafe_data.sources import Conversation, SourceItem, read_source
from bsafe_data.stages import count, hygiene
from bsafe_data.stages.record import Injection, Record
from bsafe_data.stages.rows import base_row
from bsafe_data.stages.sample import row_seed
from bsafe_data.stages.stats import ChunkStats

#: Golden-ratio step of the low-discrepancy sequence that picks the k = 0 rows (an exact share).
_GOLDEN = 0.6180339887498949
#: Draws of k before falling back to listing every clean cut point.
_CUT_DRAWS = 32
#: The authors' prompt template and end-of-text marker (``generate_training_data.py``).
AUTHORS_TEMPLATE = "[INST] {} [\\INST]"
AUTHORS_EOS = "<|end_of_text|>"
#: The kind of a placeholder record: a harmful row whose companion text (refusal) is still unwritten.
PENDING = "pending_companion"
#: How the generator writes a missing refusal (``generate.text``); the protocol is part of the cache key.
REFUSAL_PROMPT = TextPrompt(
    "derta/refusal/1",
    "You write the assistant's reply to a request it must not help with: a brief, polite refusal "
    "that gives no help with the request and may point to a safe alternative, with no insults, no "
    "personal data and no risky advice. Reply with the refusal text only.",
)


class DertaSpec(Strict):
    """DeRTa's own section: where the harmful set is and how rows are cut."""

    harmful_source: str = Field(
        ..., description="name (path or hf id) of the source with the harmful prompts and answers"
    )
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


class DertaRecipe(Recipe):
    """DeRTa: MLE with a harmful response prefix, reinforced transition optimisation, helpful mix."""

    method: Literal["derta"] = "derta"
    derta: DertaSpec

    @model_validator(mode="after")
    def _harmful_source_known(self) -> DertaRecipe:
        names = [s.name for s in self.sources]
        if self.derta.harmful_source not in names:
            raise ValueError(f"derta.harmful_source {self.derta.harmful_source!r} is not a source ({names})")
        return self


def companion_texts(sources: Sequence[SourceSpec], source_name: str, column: str) -> dict[str, str]:
    """Column ``column`` of source ``source_name`` by source row id (the same ids the build uses).

    Read with the source's own spec (file, hf, mapping, limit) with ``response`` mapped to
    ``column``; rows without it are absent. Held in memory: meant for harmful sets (thousands of rows).
    """
    spec = next(s for s in sources if s.name == source_name)
    companion = spec.model_copy(update={"mapping": spec.mapping.model_copy(update={"response": column})})
    return {item.ref.id: item.response for item in read_source(companion) if isinstance(item, Conversation)}


def companion_writer(method: Method, prompt: TextPrompt) -> TextWriter | None:
    """The writer of missing companion texts (None offline: the generator is the builtin one)."""
    if method.resources.generator.backend == "builtin":
        return None
    writer = TextWriter(method.recipe.generator, prompt, method.resources.cache_dir)
    method.resources.adopt("companion_writer", writer.close, lambda: writer.usage)
    return writer


def checked_text(written: Written, limits: LimitsSpec, controls: Any) -> Written:
    """``written`` after the generated-text checks: too long or invalid text, control strings
    (rejected or escaped as ``limits.control_strings`` says)."""
    if written.error:
        return written
    problem = hygiene.generated_problem(written.text, limits)
    if problem is not None:
        return Written(error=problem[0], detail=problem[1])
    found = hygiene.first_match(controls, [("the written answer", written.text)])
    if found is None:
        return written
    if limits.control_strings == "reject":
        return Written(error="generated_contains_control", detail=found)
    return Written(text=hygiene.escape(written.text, controls))


def write_pending(
    records: list[Record],
    writer: TextWriter,
    message: Callable[[Conversation], str],
    replan: Callable[[Conversation, Written], list[Record]],
) -> tuple[list[Record], list[Record]]:
    """Write the companion text of every ``PENDING`` record (one request each, cached) and put the
    records ``replan`` makes from it in their place; (all records, the replanned ones)."""
    pending = [r for r in records if r.kind == PENDING]
    if not pending:
        return records, []
    written = writer.write([(message(r.conv), r.seed) for r in pending])
    made = {id(r): replan(r.conv, w) for r, w in zip(pending, written, strict=True)}
    out = [x for r in records for x in made.get(id(r), [r])]
    return out, [x for new in made.values() for x in new]


def cut_points(tokenizer: Any, text: str) -> tuple[list[int], int]:
    """(token ids of ``text``, n) — the primary tokenizer's view of an answer."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids, len(ids)


def clean_prefix(tokenizer: Any, ids: Sequence[int], k: int, text: str, follow: str = "") -> str | None:
    """The text of the first ``k`` tokens if it is a clean prefix of ``text`` (no partial character,
    no trailing whitespace) whose tokens stay put when ``follow`` is appended; else None."""
    prefix = tokenizer.decode(ids[:k], clean_up_tokenization_spaces=False)
    if not prefix.strip() or prefix != prefix.rstrip() or "\ufffd" in prefix or not text.startswith(prefix):
        return None
    if follow:
        alone = tokenizer.encode(prefix, add_special_tokens=False)
        if tokenizer.encode(prefix + follow, add_special_tokens=False)[: len(alone)] != alone:
            return None
    return prefix


def sample_prefix(
    tokenizer: Any, text: str, rng: random.Random, follow: str = ""
) -> tuple[int, int, str] | None:
    """(k, n, prefix): k uniform over the clean cut points in 1 … n-1; None when there is none.

    Rejection sampling (redraw when the cut is not clean) is uniform over the clean cut points;
    ``follow`` is the text the prefix is followed by in training (see ``clean_prefix``)."""
    ids, n = cut_points(tokenizer, text)
    if n < 2:
        return None
    for _ in range(_CUT_DRAWS):
        k = rng.randint(1, n - 1)
        prefix = clean_prefix(tokenizer, ids, k, text, follow)
        if prefix is not None:
            return k, n, prefix
    clean = [(k, p) for k in range(1, n) if (p := clean_prefix(tokenizer, ids, k, text, follow)) is not None]
    if not clean:
        return None
    k, prefix = rng.choice(clean)
    return k, n, prefix


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


@register_method
class DertaMethod(Method):
    """Harmful-prefix MLE rows, RTO rows and helpful rows; no control tokens (the generator only
    writes missing refusals)."""

    name = "derta"
    recipe_model = DertaRecipe
    kinds = ("harmful_prefix", "refusal_token", "helpful")
    loss_segments = ("continuation", "violation")  # violation: only in RTO rows (transition target)
    recipe: DertaRecipe

    def __init__(self, recipe: Recipe, resources: Any):
        super().__init__(recipe, resources)
        self._written: set[str] = set()  # row ids whose refusal the generator wrote, until their row

    @cached_property
    def refusals(self) -> dict[str, str]:
        """Refusal by harmful source row id."""
        spec = self.recipe.derta
        return companion_texts(self.recipe.sources, spec.harmful_source, spec.refusal_column)

    @cached_property
    def writer(self) -> TextWriter | None:
        """The refusal writer (None offline: missing refusals are ``missing_companion``)."""
        return companion_writer(self, REFUSAL_PROMPT)

    def _harmful(self, conv: Conversation) -> bool:
        return conv.ref.dataset == self.recipe.derta.harmful_source

    def source_reason(self, conv: Conversation, spans: list[tuple[int, int]]) -> str | None:
        """``missing_companion`` for harmful prompts without a refusal (offline only)."""
        if self._harmful(conv) and not self.refusals.get(conv.ref.id, "").strip() and self.writer is None:
            return "missing_companion"
        return None

    def prepare(self, items: Sequence[SourceItem], out: ChunkOutput) -> list[Record]:
        """Plan the chunk; then write the missing refusals and plan those harmful rows."""
        records = super().prepare(items, out)
        if self.writer is None:
            return records

        def message(conv: Conversation) -> str:
            return f"{render_conversation(conv.context)}\n\nWrite the assistant's refusal."

        def replan(conv: Conversation, written: Written) -> list[Record]:
            written = checked_text(written, self.recipe.limits, self._controls)
            return self._plan_harmful(conv, written.text, written)

        records, made = write_pending(records, self.writer, message, replan)
        self._breaker(made)
        return records

    def plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[Record]:
        """Helpful: one row. Harmful: ``prefix_variants`` harmful_prefix rows and one RTO row (a
        ``PENDING`` placeholder while the generator has the refusal to write)."""
        key = self.source_key(conv)
        split = self.split_of(conv.ref.dataset, conv.ref.id)
        if not self._harmful(conv):
            return [Record(conv, key, split, self.record_seed(conv, 0), "helpful", spans)]
        refusal = self.refusals.get(conv.ref.id, "")
        if not refusal.strip():
            return [Record(conv, key, split, self.record_seed(conv, 0), PENDING)]
        return self._plan_harmful(conv, refusal)

    def _plan_harmful(self, conv: Conversation, refusal: str, written: Written | None = None) -> list[Record]:
        """The records of a harmful row with its refusal (``written``: the generator's answer, whose
        error, if any, rejects every record)."""
        key = self.source_key(conv)
        split = self.split_of(conv.ref.dataset, conv.ref.id)
        spec = self.recipe.derta
        harmful = conv.response
        answer = replace(conv, response=refusal)  # the row's safe answer
        tokenizer = self.tokenizers[self.primary]
        records = []
        for variant in range(spec.prefix_variants):
            seed = self.record_seed(conv, variant)
            record = Record(answer, f"{key}/v{variant}", split, seed, "harmful_prefix")
            records.append(record)
            if written is not None and written.error:
                record.reject(written.error, written.detail, transient=written.transient)
                continue
            if zero_prefix(conv.ref.index, variant, spec.prefix_variants, spec.zero_prefix_fraction):
                continue
            cut = sample_prefix(tokenizer, harmful, random.Random(seed), follow=answer.response)
            if cut is None:
                record.reject("harmful_too_short", "no clean token cut point inside the harmful answer")
                continue
            k, n, prefix = cut
            record.injection = Injection(0, 0, "", k / n, "", prefix)
        if spec.rto:
            seed = self.record_seed(conv, spec.prefix_variants)
            rto = Record(answer, f"{key}/rto", split, seed, "refusal_token")
            rto.injection = Injection(0, 0, "", 1.0, "", harmful)
            if written is not None and written.error:
                rto.reject(written.error, written.detail, transient=written.transient)
            records.append(rto)
        if written is not None and not written.error:
            self._written.update(r.row_id for r in records)
        return records

    def label(self, records: list[Record]) -> int:
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
        return 0

    def items_of(self, record: Record, targets: Sequence[str]) -> list[Item]:
        """The safe answer (``response``: refusal or helpful answer) and the harmful text."""
        context = record.conv.context
        items = []
        if "response" in targets:
            items.append(Item(record.conv.response, "response", context))
        injection = record.injection
        if "violation" in targets and injection is not None and injection.violation.strip():
            items.append(Item(injection.violation.strip(), "violation", context, "", injection.violation))
        return items

    def build_row(self, record: Record) -> dict[str, Any]:
        """Segments and the primary tokenizer's prompt/completion of each kind."""
        row = base_row(record.conv, record.row_id)
        head, tail = record.frames.get(self.primary, ("", ""))
        row["kind"] = record.kind
        row["scores"] = record.scores
        if record.row_id in self._written:
            self._written.discard(record.row_id)
            generator = self.resources.generator
            row["generator"] = {"backend": generator.backend, "model": generator.model,
                                "template": REFUSAL_PROMPT.protocol, "seed": record.seed}  # fmt: skip
        response = record.conv.response
        injection = record.injection
        if injection is not None:
            row["injection"] = {
                "offset": 0,
                "relative_position": injection.relative,
                "sentence_index": 0,
                "category": injection.category,
                "steering": "",
                "violation": injection.violation,
            }
        if record.kind == "refusal_token":
            harmful = injection.violation if injection else ""
            row["segments"] = [{"kind": "violation", "text": harmful, "loss": True}]
            row["prompt"], row["completion"] = head + harmful, ""
            return row
        prefix = injection.violation if injection else ""
        segments = [{"kind": "violation", "text": prefix, "loss": False}] if prefix else []
        row["segments"] = segments + clean_segments(response)
        row["prompt"], row["completion"] = head + prefix, response + tail
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
