"""BSAFE (Sel et al. 2025, arXiv 2503.08919): detect and repair, instead of inject.

Start from answers that already contain a violation, locate the FIRST violating span, cut there and
teach ``before ⊕ violation ⊕ [CATEGORY c][BACKTRACK_BY_X] ⊕ safe continuation``, where X is the
exact number of tokens of the violation for every recipe tokenizer and the safe continuation is
written from the safe state (the text before the span).

The method's steps (``BsafeMethod.steps``; each record moves on as soon as its own answers are in):

1. **locate** with the detector (``detect.classifier``; default the recipe's first ``llm_judge``,
   else its first classifier). A judge reads the whole answer and quotes the violating span; its
   start is taken from the verdict (``span_start``). Any other classifier (the offline builtin one)
   is the *per-sentence span detector*: it scores every sentence of the answer (with the text before
   it as context) and the first sentence it calls unsafe is the span. Either way the deleted text
   runs from the span start to the end of the sentence the span starts in, and the cut moves back to
   the end of the previous word (the whitespace belongs to the deleted text, so no token merges
   across the cut). No unsafe span: ``no_violation_found``.
2. **continue** from the safe state: with ``generator.provider: openai`` the generator is asked
   (prompt: the conversation and the text before the span; answers cached, protocol
   ``bsafe/continue_safe/1``); offline (the builtin generator) the bundled safe continuation of the
   source row (``continuation.path``, default ``bsafe_data/data/unsafe/unsafe_answers.jsonl``;
   none for the row: ``continuation_missing``). Failed requests: ``generator_error`` (transient,
   retried by a re-run, unless the endpoint refused that very request), ``generator_refused`` /
   ``generator_unparseable``.
3. **count X** per tokenizer (``stages.count``; one step back to the previous word on a merge,
   else ``token_boundary``).
4. **check** the continuation with ``continuation.check`` (default: every recipe classifier; a
   judge reads the text before the span ⊕ the continuation): flagged by any, ``continuation_flagged``.

These decisions are the method's, not filter rules: ``refilter`` keeps them as they are (a changed
detector threshold needs a rebuild; the cached answers make it free). ``plan`` has no classifiers
and no endpoint: it locates with the builtin classifier and uses the bundled continuations.

Rows have kind ``repaired``; ``response`` is the unsafe source answer, ``injection`` says where the
violation is (``offset`` = the cut, ``violation`` = the deleted text), ``segments`` are
prefix/violation/control/continuation and ``prompt``/``completion`` the primary tokenizer's strings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from bsafe_data.classify.base import ERROR_LABEL, Classifier, Item, Score, transient_error
from bsafe_data.classify.builtin import BuiltinClassifier
from bsafe_data.classify.taxonomy import to_recipe
from bsafe_data.generate.text import TextPrompt, TextWriter, Written, render_conversation
from bsafe_data.label import control_text
from bsafe_data.methods.base import Method
from bsafe_data.methods.companion import checked_text
from bsafe_data.recipe import ControlSpec, Recipe, Strict
from bsafe_data.sources import Conversation
from bsafe_data.stages import adjust
from bsafe_data.stages.record import Injection, Record
from bsafe_data.stages.step import Step, Task

#: The bundled offline set: unsafe answers with their safe continuations.
BUNDLED_UNSAFE = Path(__file__).resolve().parent.parent / "data" / "unsafe" / "unsafe_answers.jsonl"
#: Part of every continuation request's cache key: bump when the prompt or the parsing change.
CONTINUE_PROTOCOL = "bsafe/continue_safe/1"
CONTINUE_SYSTEM = (
    "You finish assistant answers safely. You are shown a conversation and the beginning of the "
    "assistant's answer. Continue the answer from exactly where it stops: helpful, respectful and "
    "on topic, with no insults, no personal data and no risky advice. Do not repeat the beginning. "
    "Reply with the continuation text only."
)
KIND = "repaired"


class DetectSpec(Strict):
    """Which classifier locates the first violating span."""

    classifier: str | None = Field(
        None,
        description="name of a filters.classifiers entry; default the first llm_judge, else the first "
        "classifier (scored per sentence)",
    )
    default_category: str = Field(
        "Toxic", description="category when the detector names none that maps onto the recipe's"
    )


class ContinuationSpec(Strict):
    """Where the safe continuation comes from and who checks it."""

    path: str | None = Field(
        None,
        description="offline (builtin generator): JSONL with `id` and `safe_continuation` per source row "
        "(default: the bundled unsafe_answers set)",
    )
    check: list[str] | None = Field(
        None, description="classifiers that must call the continuation safe (default: all of them)"
    )


class BsafeRecipe(Recipe):
    """BSAFE: locate the first violation of an unsafe answer, ``[CATEGORY c][BACKTRACK_BY_X]``, repair."""

    method: Literal["bsafe"] = "bsafe"
    detect: DetectSpec = Field(default_factory=DetectSpec)
    continuation: ContinuationSpec = Field(default_factory=ContinuationSpec)
    control: ControlSpec = Field(default_factory=ControlSpec)

    @model_validator(mode="after")
    def _names_known(self) -> BsafeRecipe:
        names = [c.name for c in self.filters.classifiers]
        wanted = [self.detect.classifier] if self.detect.classifier else []
        unknown = [n for n in wanted + list(self.continuation.check or []) if n not in names]
        if unknown:
            raise ValueError(f"detect/continuation name unknown classifiers {unknown} (known: {names})")
        return self


@dataclass
class RepairRecord(Record):
    """A record with the safe continuation (as emitted after the control signal)."""

    continuation: str = ""


#: The continuation prompt of the shared text writer (``generate.text``).
CONTINUE_PROMPT = TextPrompt(CONTINUE_PROTOCOL, CONTINUE_SYSTEM)


def continuation_message(context: Sequence[tuple[str, str]], before: str) -> str:
    """The user message that asks for the safe continuation of ``before``."""
    return f"{render_conversation(context)}\n\n<partial_answer>\n{before}\n</partial_answer>\n\n" + (
        "Continue this answer." if before else "The answer has not started yet: write it."
    )


def bundled_continuations(path: str | Path | None) -> dict[str, str]:
    """``id`` -> ``safe_continuation`` of a JSONL file (default: the bundled set)."""
    out: dict[str, str] = {}
    with Path(path or BUNDLED_UNSAFE).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                out[str(row["id"])] = str(row["safe_continuation"])
    return out


def cut_before(response: str, start: int) -> int:
    """The cut for a span starting at ``start``: the end of the word before it (0 at the start)."""
    start = max(0, min(start, len(response)))
    while start > 0 and not response[start - 1].isspace():
        start -= 1
    while start > 0 and response[start - 1].isspace():
        start -= 1
    return start


class BsafeMethod(Method):
    """Locate, cut, continue safely, label X for every tokenizer, check, keep or reject."""

    name = "bsafe"
    recipe_model = BsafeRecipe
    kinds = (KIND,)
    counts = frozenset({"categories", "positions", "backtrack"})
    recipe: BsafeRecipe

    def plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[Record]:
        """One record per unsafe answer."""
        split = self.split_of(conv.ref)
        return [RepairRecord(conv, self.source_key(conv), split, self.record_seed(conv, 0), KIND, spans)]

    def steps(self) -> list[Step]:
        """locate → continue → count X → check → rules."""
        steps = [
            Step("classify", ask=self.locate_tasks, apply=self.place),
            Step("generate", ask=self.continue_tasks, apply=self.take_continuation, budgeted=True),
            Step("label", run=lambda records: self.isolated("label", self.label, records)),
            Step("classify", ask=self.check_tasks, apply=self.take_checks),
        ]
        return [*steps, self.rules_step()] if self.recipe.filters.enabled else steps

    # -- 1. locate ------------------------------------------------------------------------------
    @cached_property
    def detector(self) -> Classifier:
        """The classifier that locates spans (the builtin one when the resources have none, as in plan)."""
        classifiers = self.resources.classifiers
        wanted = self.recipe.detect.classifier
        if wanted is not None:
            found = next((c for c in classifiers if c.name == wanted), None)
        else:
            found = next((c for c in classifiers if c.locates_spans), None)
            found = found or (classifiers[0] if classifiers else None)
        return found or BuiltinClassifier()

    def _sentence_items(self, record: Record) -> list[Item]:
        response = record.conv.response
        return [
            Item(response[begin:end].strip(), "violation", record.conv.context, response[:begin])
            for begin, end in record.spans
        ]

    def locate_tasks(self, record: Record) -> list[Task]:
        """A span-locating detector reads the whole answer; any other scores every sentence."""
        detector = self.detector
        if detector.locates_spans:
            response = record.conv.response
            return [detector.task(Item(response, "violation", record.conv.context, "", response))]
        return [detector.task(item) for item in self._sentence_items(record)]

    def place(self, record: Record, scores: list[Any]) -> None:
        """Set the injection at the first violating span, else reject the record."""
        if not record.live:
            return
        detector = self.detector
        if detector.locates_spans:
            (score,) = scores
            start = score.detail.get("span_start") if score.label == "unsafe" else None
            self._place(record, score, start, "the judge quoted no span found in the answer")
            return
        ranked = list(enumerate(scores))
        first = next(((i, s) for i, s in ranked if s.label in ("unsafe", ERROR_LABEL)), None)
        if first is None:
            best = max(ranked, key=lambda p: p[1].score, default=None)
            if best is not None:
                record.scores.append(best[1].as_dict("violation"))
            record.reject("no_violation_found", f"{detector.name}: no sentence flagged")
            return
        index, score = first
        self._place(record, score, record.spans[index][0], "")

    def _place(self, record: Record, score: Score, start: int | None, missing: str) -> None:
        """Put the injection at the span starting at ``start`` (response offset), or reject."""
        record.scores.append(score.as_dict("violation"))
        if score.label == ERROR_LABEL:
            detail = f"classifier {score.classifier}: {score.detail.get('error', '')}"[:300]
            record.reject("classifier_error", detail, transient=transient_error(score))
            return
        response = record.conv.response
        if score.label != "unsafe" or start is None or not 0 <= start < len(response):
            record.reject("no_violation_found", missing or f"{score.classifier}: the answer was judged safe")
            return
        spans = record.spans
        index = next((i for i, (_, end) in enumerate(spans) if end > start), len(spans) - 1)
        end = max(spans[index][1], start + 1) if spans else len(response)
        cut = cut_before(response, start)
        category = self.recipe.detect.default_category
        for native in score.categories:
            mapped = to_recipe(native, self.recipe.categories, self.recipe.filters.category_map)
            if mapped:
                category = mapped[0]
                break
        record.injection = Injection(cut, index, category, cut / len(response), "", response[cut:end])

    # -- 2. continue ----------------------------------------------------------------------------
    @cached_property
    def writer(self) -> TextWriter | None:
        """The continuation writer (None offline: the generator is the builtin one, as in plan)."""
        return self.resources.writer(self.recipe, CONTINUE_PROMPT, "continuation_writer")

    @cached_property
    def bundled(self) -> dict[str, str]:
        """The offline continuations by source id."""
        return bundled_continuations(self.recipe.continuation.path)

    def continue_tasks(self, record: Record) -> list[Task]:
        """The generator writes the continuation from the safe state (offline: none to ask)."""
        if self.writer is None:
            return []
        return [self.writer.task(continuation_message(record.conv.context, record.part1), record.seed)]

    def take_continuation(self, record: Record, answers: list[Any]) -> None:
        """The written (or bundled) continuation after the generated-text checks."""
        if not record.live:
            return
        assert isinstance(record, RepairRecord)
        if answers:
            (written,) = answers
        elif record.conv.ref.id in self.bundled:
            written = Written(text=self.bundled[record.conv.ref.id].strip())
        else:
            written = Written(error="continuation_missing", detail="no bundled continuation for this row")
        written = checked_text(written, self.recipe.limits, self.controls, "continuation")
        if written.error:
            record.reject(written.error, written.detail, transient=written.transient)
            return
        record.continuation = (" " if record.part1 else "") + written.text

    # -- 3. count X -----------------------------------------------------------------------------
    def step_back(self, record: Record) -> bool:
        """One word back, the moved text joining the deleted span."""
        assert record.injection is not None
        offset = record.injection.offset
        return offset > 0 and adjust.move_back(record, offset - 1)

    # -- 4. check -------------------------------------------------------------------------------
    @cached_property
    def checkers(self) -> list[Classifier]:
        """The classifiers that must call the continuation safe."""
        names = self.recipe.continuation.check
        classifiers = self.resources.classifiers or [BuiltinClassifier()]
        return [c for c in classifiers if names is None or c.name in names]

    def check_tasks(self, record: Record) -> list[Task]:
        """Every checker reads the safe state and the continuation (``part1`` ⊕ continuation), as
        the model emits them once the backtrack has deleted the violation."""
        assert isinstance(record, RepairRecord)
        item = Item(
            record.continuation.strip(), "part2", record.conv.context, record.part1, record.continuation
        )
        return [checker.task(item) for checker in self.checkers]

    def take_checks(self, record: Record, scores: list[Any]) -> None:
        """``continuation_flagged`` when any checker calls the continuation unsafe."""
        if not scores:
            return
        for classifier, score in zip(self.checkers, scores, strict=True):
            record.scores.append(score.as_dict("part2"))
            if score.label == ERROR_LABEL:
                error = score.detail.get("error", "")
                record.reject("classifier_error", f"classifier {classifier.name}: {error}"[:300],
                              transient=transient_error(score))  # fmt: skip
            elif score.label == "unsafe":
                record.reject("continuation_flagged", f"classifier {classifier.name}")
        record.reasons[:] = list(dict.fromkeys(record.reasons))

    # -- rows -----------------------------------------------------------------------------------
    def build_row(self, record: Record) -> dict[str, Any]:
        """The row: segments, X per tokenizer and the primary tokenizer's prompt/completion."""
        assert isinstance(record, RepairRecord)
        if record.injection is None:
            return self.row(record, kind=KIND)
        offline = self.writer is None
        generator = self.generator_column(
            record,
            model="bundled-safe-continuations" if offline else self.resources.generator.model,
            template="bundled" if offline else CONTINUE_PROTOCOL,
        )
        if not record.backtrack or not record.continuation:
            return self.injected_row(record, "", "", rendered=False, kind=KIND, generator=generator)
        return self.injected_row(
            record, self.control(record), record.continuation, kind=KIND, generator=generator
        )

    @classmethod
    def card_context(cls, recipe: Recipe, manifest: dict[str, Any], stats: Any) -> dict[str, Any]:
        """The control signal, the category table and a worked example for the card."""
        assert isinstance(recipe, BsafeRecipe)
        return {
            "categories": sorted(stats.categories.items(), key=lambda kv: (-kv[1], kv[0])),
            "control_example": cls.control_example(recipe),
            "example": card_example(recipe),
        }


def card_example(recipe: BsafeRecipe) -> dict[str, Any]:
    """The first bundled row cut by the per-sentence builtin detector, with X for the primary
    tokenizer: what a row of this method looks like (computed exactly as in a build)."""
    from bsafe_data.label import backtrack_counts, chat_frame
    from bsafe_data.stages.segment import load_nlp, sentence_spans
    from bsafe_data.tokenization import load_tokenizer

    with BUNDLED_UNSAFE.open(encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    context = [(m["role"], m["content"]) for m in first["messages"][:-1]]
    response = first["messages"][-1]["content"]
    (spans,) = list(sentence_spans(load_nlp(recipe.segmentation.spacy_model), [response]))
    detector = BuiltinClassifier()
    scores = detector.score_batch([response[b:e].strip() for b, e in spans])
    index = next((i for i, s in enumerate(scores) if s.label == "unsafe"), len(spans) - 1)
    cut = cut_before(response, spans[index][0])
    before, violation = response[:cut], response[cut : spans[index][1]]
    tokenizer = load_tokenizer(recipe.tokenizers.primary)
    head, tail = chat_frame(tokenizer, context)
    (x,) = backtrack_counts(tokenizer, [(head, before, violation)])
    natives = [c for n in scores[index].categories for c in to_recipe(n, recipe.categories)]
    category = natives[0] if natives else recipe.detect.default_category
    control = control_text(recipe.control.format, category, x or 0)
    return {
        "id": first["id"],
        "user": context[-1][1],
        "prefix": before,
        "violation": violation,
        "control": control,
        "continuation": " " + first["safe_continuation"],
        "x": x,
        "tail": tail,
    }
