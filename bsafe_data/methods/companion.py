"""What DeRTa and Reset share: a harmful source whose rows need a companion text (a refusal, a safe
answer), read from a column of the source or written by the generator.

``CompanionMethod`` is their base: the companion texts by row position (``companion_texts``), the
writer (the generator's endpoint; offline a harmful row without its text is ``missing_companion``),
the step that writes the missing ones (one request per harmful conversation: its records share it,
and the engine sends it once) and hands each record the checked text (``with_companion``, the
method's own), and the spans such rows have (the trained answer and the harmful text);
``sample_prefix`` cuts a harmful answer at a clean token boundary.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from pydantic import Field, model_validator

from bsafe_data.classify.base import Item
from bsafe_data.generate.text import TextPrompt, TextWriter, Written, render_conversation
from bsafe_data.methods.base import Method
from bsafe_data.recipe import LimitsSpec, Recipe, SourceSpec, Strict
from bsafe_data.sources import Conversation, read_source, source_identity
from bsafe_data.stages import hygiene
from bsafe_data.stages.record import Record
from bsafe_data.stages.step import Step, Task


class HarmfulSourceSpec(Strict):
    """The section naming the harmful source (a method's own section adds to it)."""

    harmful_source: str = Field(
        ..., description="name (path or hf id) of the source with the harmful prompts and answers"
    )


class CompanionRecipe(Recipe):
    """A recipe whose section ``companion_section`` names a harmful source among its sources."""

    companion_section: ClassVar[str]

    @model_validator(mode="after")
    def _harmful_source_known(self) -> CompanionRecipe:
        wanted = getattr(self, self.companion_section).harmful_source
        if not any(s.matches(wanted) for s in self.sources):
            names = [s.name or s.location for s in self.sources]
            raise ValueError(f"{self.companion_section}.harmful_source {wanted!r} is not a source ({names})")
        return self

    def harmful_spec(self) -> SourceSpec:
        """The source ``harmful_source`` names (by its name or its location)."""
        wanted = getattr(self, self.companion_section).harmful_source
        return next(s for s in self.sources if s.matches(wanted))


@dataclass
class CompanionRecord(Record):
    """A record of a harmful source row: its harmful answer, and whether the generator still has
    its companion text to write (the record's ``conv.response`` becomes that text)."""

    harmful: str = ""
    needs_companion: bool = False


def companion_texts(spec: SourceSpec, column: str) -> dict[int, str]:
    """Column ``column`` of a source by row position (the positions the build reads).

    Read with the source's own spec (file, hf, mapping, limit) with ``response`` mapped to
    ``column``; rows without it are absent. Held in memory: meant for harmful sets (thousands of rows).
    """
    companion = spec.model_copy(update={"mapping": spec.mapping.model_copy(update={"response": column})})
    return {
        item.ref.index: item.response for item in read_source(companion) if isinstance(item, Conversation)
    }


def checked_text(
    written: Written, limits: LimitsSpec, controls: Any, what: str = "the written answer"
) -> Written:
    """``written`` after the generated-text checks: too long or invalid text, control strings
    (rejected or escaped as ``limits.control_strings`` says)."""
    if written.error:
        return written
    problem = hygiene.generated_problem(written.text, limits)
    if problem is not None:
        return Written(error=problem[0], detail=problem[1])
    found = hygiene.first_match(controls, [(what, written.text)])
    if found is None:
        return written
    if limits.control_strings == "reject":
        return Written(error="generated_contains_control", detail=found)
    return Written(text=hygiene.escape(written.text, controls))


#: Draws of k before falling back to listing every clean cut point.
_CUT_DRAWS = 32


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


def answer_and_harmful_items(record: Record, targets: Sequence[str]) -> list[Item]:
    """The trained answer (``response``: refusal, safe or helpful answer) and the harmful text
    (``violation``: a prefix, or the whole harmful answer)."""
    context = record.conv.context
    items = []
    if "response" in targets:
        items.append(Item(record.conv.response, "response", context))
    injection = record.injection
    if "violation" in targets and injection is not None and injection.violation.strip():
        items.append(Item(injection.violation.strip(), "violation", context, "", injection.violation))
    return items


class CompanionMethod(Method):
    """A method over a harmful source whose rows need a companion text (see the module docstring)."""

    #: how the generator writes a missing companion text (its protocol is part of the cache key)
    companion_prompt: ClassVar[TextPrompt]
    #: what the user message asks for, after the conversation
    companion_ask: ClassVar[str]
    #: the field of the recipe's companion section naming the column with the companion text
    companion_column: ClassVar[str]
    recipe: CompanionRecipe

    @abstractmethod
    def with_companion(self, record: CompanionRecord, text: str, written: Written | None = None) -> None:
        """Finish a harmful record once its companion text is known (``written``: the generator's
        answer, whose error, if any, rejects the record)."""

    @cached_property
    def companions(self) -> dict[int, str]:
        """The companion text by harmful source row position."""
        section = getattr(self.recipe, self.recipe.companion_section)
        return companion_texts(self.recipe.harmful_spec(), getattr(section, self.companion_column))

    @cached_property
    def harmful_dataset(self) -> str:
        """The harmful source's identity in rows (``source.dataset``)."""
        return source_identity(self.recipe.harmful_spec()).dataset

    @cached_property
    def writer(self) -> TextWriter | None:
        """The companion writer (None offline: missing texts are ``missing_companion``)."""
        return self.resources.writer(self.recipe, self.companion_prompt, "companion_writer")

    def is_harmful(self, conv: Conversation) -> bool:
        """Whether the conversation comes from the harmful source."""
        return conv.ref.dataset == self.harmful_dataset

    def source_reason(self, conv: Conversation, spans: list[tuple[int, int]]) -> str | None:
        """``missing_companion`` for harmful rows without their text (offline only)."""
        if (
            self.is_harmful(conv)
            and not self.companions.get(conv.ref.index, "").strip()
            and self.writer is None
        ):
            return "missing_companion"
        return None

    def start_harmful(self, record: CompanionRecord) -> None:
        """Finish the record with the source's companion text, or mark it for the writer."""
        text = self.companions.get(record.conv.ref.index, "")
        if text.strip():
            self.with_companion(record, text)
        else:
            record.needs_companion = True

    def steps(self) -> list[Step]:
        """Write the missing companion texts → check and label → classify → rules."""
        return [self._write_step(), Step("label", run=self.label_step), *self.filter_steps()]

    def _write_step(self) -> Step:
        writer = self.writer

        def tasks(record: Record) -> list[Task]:
            if writer is None or not isinstance(record, CompanionRecord) or not record.needs_companion:
                return []
            conv = record.conv
            message = f"{render_conversation(conv.context)}\n\n{self.companion_ask}"
            return [writer.task(message, self.record_seed(conv, 0))]  # one per conversation

        def apply(record: Record, answers: list[Any]) -> None:
            if answers:
                assert isinstance(record, CompanionRecord)
                (written,) = answers
                written = checked_text(written, self.recipe.limits, self.controls)
                self.with_companion(record, written.text, written)

        return Step("generate", ask=tasks, apply=apply, budgeted=True)

    def items_of(self, record: Record, targets: Sequence[str]) -> list[Item]:
        """The trained answer (``response``) and the harmful text (``violation``)."""
        return answer_and_harmful_items(record, targets)
