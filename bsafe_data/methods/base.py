"""The Method interface: what a data-construction method declares and the steps it adds.

A method turns source conversations into rows. It declares its recipe model (a subclass of
``Recipe`` with ``method: Literal[NAME]``), its row kinds and loss segments, and implements

* ``plan(conv, spans)``: the records (future rows) of one source conversation (default: one record
  of the first kind), and
* ``build_row(record)``: the row of the row contract for a finished record.

Everything else has a default here: source checks (hygiene, segmentation), and ``steps()``, the
list of steps the executor's flow moves every record through (``stages.step``)::

    generate (hook ``request``) → check generated text, label X (hooks ``label``, ``step_back``)
            → classify (hook ``items_of``; judges first, hook ``on_judge``) → rules

A method with another order (BSAFE: locate, continue, label, check) returns its own list. Rows are
emitted in record order when a chunk's last record is done, whatever order the answers came in.
Dataset-wide duplicate detection runs after all chunks (``stages.dedupe``). The registry
(``bsafe_data.registry``) finds a method from the recipe's ``method``.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import datasets

from bsafe_data.classify.base import Classifier, Item, Score
from bsafe_data.classify.rules import RuleSet
from bsafe_data.errors import BuildError
from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.generate.text import TextPrompt, TextWriter
from bsafe_data.label import control_patterns, control_text, control_vocabulary, segments_for
from bsafe_data.llm.batch import BatchOptions
from bsafe_data.llm.engine import Engine
from bsafe_data.llm.errors import FatalEndpointError
from bsafe_data.recipe import Recipe
from bsafe_data.rows import ROW_FEATURES
from bsafe_data.sources import Conversation, SourceItem, SourceRef, SourceReject
from bsafe_data.stages import adjust, count, hygiene
from bsafe_data.stages import rules as rules_stage
from bsafe_data.stages.classify import classify_steps, span_items
from bsafe_data.stages.generate import generate_step
from bsafe_data.stages.record import Record
from bsafe_data.stages.rows import base_row, clean_row, generator_column, injection_column, rejected_row
from bsafe_data.stages.sample import row_seed, split_of
from bsafe_data.stages.segment import sentence_spans
from bsafe_data.stages.stats import ChunkStats
from bsafe_data.stages.step import Step

_VARIANT = re.compile(r"/v(\d+)$")


def error_detail(stage: str, exc: BaseException) -> str:
    """``stage: ErrorType: message`` (shortened) for a row's ``detail``."""
    return f"{stage}: {type(exc).__name__}: {exc}"[:300]


@dataclass
class Resources:
    """What a worker loads once: spaCy, tokenizers (primary first), the engine, the generator, the
    classifiers and the companion writers methods ask for. ``close`` releases all of it."""

    nlp: Any
    tokenizers: dict[str, Any]
    generator: Generator
    classifiers: list[Classifier] = field(default_factory=list)
    engine: Engine = field(default_factory=Engine)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    _writers: dict[str, TextWriter] = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        recipe: Recipe,
        cache_dir: Path | None = None,
        generator: Generator | None = None,
        batch: BatchOptions | None = None,
    ) -> Resources:
        """Load everything ``recipe`` names; unloadable parts raise BuildError with the reason.
        ``generator`` replaces the recipe's (the caller closes it); ``batch`` is where endpoints in
        batch mode keep their state (a build's work folder) and the build's batch flags."""
        from bsafe_data.classify.factory import make_classifiers
        from bsafe_data.generate.factory import make_generator
        from bsafe_data.stages.segment import load_nlp
        from bsafe_data.tokenization import load_tokenizer

        stack = ExitStack()
        engine = Engine(cache_dir, batch)
        stack.callback(engine.close)
        try:
            tokenizers = {ref: load_tokenizer(ref) for ref in recipe.tokenizers.all}
            nlp = load_nlp(recipe.segmentation.spacy_model)
            if generator is None:
                generator = make_generator(recipe.generator, engine)
                stack.callback(generator.close)
            classifiers = make_classifiers(recipe, engine)
            for classifier in classifiers:
                stack.callback(classifier.close)
            if generator.remote or any(c.remote for c in classifiers):
                engine.cache  # noqa: B018 - open it now: a broken cache fails the set-up, named
        except Exception as exc:  # TokenizerLoadError, SegmentationError, GeneratorUnavailable, ...
            stack.close()  # all carry readable messages
            raise BuildError(str(exc)) from None
        return cls(nlp, tokenizers, generator, classifiers, engine, stack)

    def writer(self, recipe: Recipe, prompt: TextPrompt, name: str) -> TextWriter | None:
        """The companion writer of ``prompt`` on the generator's endpoint (None offline: the
        generator is not an endpoint); its usage is reported as ``name``."""
        if not self.generator.remote:
            return None
        found = self._writers.get(name)
        if found is None:
            found = self._writers[name] = TextWriter(recipe.generator, prompt, self.engine)
        return found

    def close(self) -> None:
        """Close the generator, the classifiers and the engine opened here."""
        self._stack.close()

    def usage(self) -> dict[str, dict[str, Any]]:
        """Usage counters of every client, by name: ``generator``, ``classifier:NAME`` and the
        companion writers (requests, cache hits, tokens, ... as each client counts them)."""
        clients = {"generator": dict(self.generator.usage)}
        clients.update({f"classifier:{c.name}": dict(c.usage) for c in self.classifiers})
        clients.update({name: dict(writer.usage) for name, writer in self._writers.items()})
        return clients


@dataclass
class ChunkOutput:
    """What one chunk produced: kept rows per split, rejected rows, and their counters.

    ``extra`` holds the rows of the method's extra configs (config -> split -> rows), derived from
    kept rows by ``Method.extra_rows``; ``extra_features`` their schemas (``Method.extra_configs``).
    """

    kept: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"train": [], "test": []})
    rejected: list[dict[str, Any]] = field(default_factory=list)
    stats: ChunkStats = field(default_factory=ChunkStats)
    extra: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    extra_features: dict[str, datasets.Features] = field(default_factory=dict)


class Method(ABC):
    """Base of every method: identities, splits, source checks, the default steps, row helpers."""

    #: the ``method`` value of its recipes
    name: ClassVar[str]
    #: its recipe model (``method: Literal[name]`` plus the method's own sections)
    recipe_model: ClassVar[type[Recipe]]
    #: the values of the ``kind`` column it produces (default: backtracking rows and clean rows)
    kinds: ClassVar[tuple[str, ...]] = ("injected", "clean")
    #: the segment kinds trained on (``loss`` true; default: the control signal and what follows)
    loss_segments: ClassVar[tuple[str, ...]] = ("control", "continuation")
    #: extra configs (name -> schema) whose rows ``extra_rows`` derives from kept rows (e.g. DPO
    #: pairs); written as ``NAME/{split}-….parquet`` next to ``data/`` and ``rejected/``
    extra_configs: ClassVar[dict[str, datasets.Features]] = {}
    #: the columns of its rows (``rows.ROW_FEATURES``; the rejected config adds reasons and detail)
    features: ClassVar[datasets.Features] = ROW_FEATURES
    #: counters of every kept row with an injection (any of "categories", "positions",
    #: "backtrack"); None: the method's own ``count_row`` counts
    counts: ClassVar[frozenset[str] | None] = frozenset()
    #: row order within a chunk: rejected source rows, then by source position and "id" or
    #: "variant" (the ``…/vN`` of the id); None: the method's own ``order_key``
    row_order: ClassVar[str | None] = "id"

    def __init__(self, recipe: Recipe, resources: Resources):
        self.recipe = recipe
        self.resources = resources
        self.tokenizers = resources.tokenizers
        self.primary = recipe.tokenizers.primary
        self.rules = self.rules_for(recipe)
        self.multi_source = len(recipe.sources) > 1
        self.timings: Counter[str] = Counter()  # seconds per stage, summed over chunks

    @classmethod
    def rules_for(cls, recipe: Recipe) -> RuleSet:
        """The recipe's filter rules (the same for build and refilter)."""
        return RuleSet(recipe.filters, recipe.categories, recipe.tokenizers.primary)

    # -- identities ------------------------------------------------------------------------------
    def source_key(self, item: SourceItem) -> str:
        """A source row's key: its position in its source (prefixed with the source's identity when
        the recipe has several), whatever id the row carries, so keys are unique."""
        ref = item.ref
        return f"{ref.dataset}:{ref.index}" if self.multi_source else str(ref.index)

    def split_of(self, ref: SourceRef) -> str:
        """train/test by source row, so no answer appears in both splits."""
        return split_of(
            self.recipe.seed, self.recipe.split.test_fraction, ref.dataset, ref.revision, ref.index
        )

    def record_seed(self, conv: Conversation, variant: int) -> int:
        """The seed of one row: from (recipe seed, source identity, row position, variant),
        independent of order, paths and the ids rows carry."""
        ref = conv.ref
        return row_seed(self.recipe.seed, ref.dataset, ref.revision, ref.index, variant)

    def new_record(self, conv: Conversation, kind: str, spans: list[tuple[int, int]] | None = None) -> Record:
        """The one record of a conversation (id: the source key; seed: variant 0)."""
        split = self.split_of(conv.ref)
        return Record(conv, self.source_key(conv), split, self.record_seed(conv, 0), kind, spans or [])

    # -- plan ------------------------------------------------------------------------------------
    def source_reason(self, conv: Conversation, spans: list[tuple[int, int]]) -> str | None:
        """A reason code when a usable conversation still cannot serve this method (default none)."""
        return None

    def plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[Record]:
        """The records of one source conversation (default: one, of the first kind)."""
        return [self.new_record(conv, self.kinds[0], spans)]

    # -- steps -----------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        """generate → check and label → classify → rules (see the module docstring)."""
        generator = self.resources.generator
        steps = [
            generate_step(generator, self.request, self.apply_generation),
            Step("label", run=self.label_step),
        ]
        return steps + self.filter_steps()

    def filter_steps(self) -> list[Step]:
        """Classification and the rules, when filters are on."""
        if not self.recipe.filters.enabled:
            return []
        return [*classify_steps(self.resources.classifiers, self.items_of, self.on_judge), self.rules_step()]

    def rules_step(self) -> Step:
        """The recipe's filter rules on the recorded scores."""
        return Step("rules", run=lambda records: rules_stage.apply_rules(self.rules, records))

    def request(self, record: Record) -> GenerationRequest | None:
        """The generator request a live record needs (default: none)."""
        return None

    def generation_request(self, record: Record) -> GenerationRequest:
        """A violation of the record's category that continues ``part1`` (for ``request``)."""
        injection = record.injection
        assert injection is not None
        return GenerationRequest(
            record.row_id, record.conv.context, record.part1, injection.category, record.seed
        )

    def apply_generation(self, record: Record, generation: Generation) -> None:
        """Take a usable generator answer into the record: steering and violation."""
        assert record.injection is not None
        record.injection.steering, record.injection.violation = generation.steering, generation.violation

    def label_step(self, records: list[Record]) -> None:
        """Check the generated text, then ``label`` (isolated: a failing record is ``row_error``)."""
        self._check_generated(records)
        self.isolated("label", self.label, records)

    def label(self, records: list[Record]) -> None:
        """Chat frames; X for every tokenizer of the records with an injection (``step_back`` once
        on a merging boundary, else ``token_boundary``)."""
        count.frame(self.tokenizers, records)
        todo = [r for r in records if r.injection is not None and r.live]
        count.count_with_repair(self.tokenizers, todo, self.step_back)

    def step_back(self, record: Record) -> bool:
        """Move a merging boundary back (default: to the end of the previous word)."""
        return adjust.previous_word_end(record)

    def items_of(self, record: Record, targets: Sequence[str]) -> list[Item]:
        """The spans of a record a classifier with these targets scores."""
        return span_items(record, targets)

    def on_judge(self, verdicts: list[tuple[Record, Item, Score]]) -> None:  # noqa: B027 - optional hook
        """React to the verdicts of span-adjusting judges (default: nothing)."""

    # -- rows ------------------------------------------------------------------------------------
    @abstractmethod
    def build_row(self, record: Record) -> dict[str, Any]:
        """The row of the row contract for a record (reasons are added by the caller)."""

    def row(self, record: Record, **fields: Any) -> dict[str, Any]:
        """A row with the record's identity, source, context, response, scores and ``fields``."""
        row = base_row(record.conv, record.row_id)
        row["scores"] = record.scores
        row.update(fields)
        return row

    def frame(self, record: Record) -> tuple[str, str]:
        """The primary tokenizer's chat frame (head, tail) of a record ('' before labelling)."""
        return record.frames.get(self.primary, ("", ""))

    def clean_row(self, record: Record, **fields: Any) -> dict[str, Any]:
        """The row of a record without an injection: the whole answer, trained on."""
        return clean_row(self.row(record, **fields), self.frame(record))

    def injected_row(
        self, record: Record, control: str, continuation: str, *, rendered: bool = True, **fields: Any
    ) -> dict[str, Any]:
        """The row of a record whose injection ``control`` deletes, then ``continuation``:
        injection, segments and, when ``rendered``, X per tokenizer and the primary tokenizer's
        prompt/completion (a rejected record that was never labelled has none)."""
        injection = record.injection
        assert injection is not None
        row = self.row(record, injection=injection_column(injection), **fields)
        part1 = record.part1
        row["segments"] = segments_for(part1, injection.steering, injection.violation, control, continuation)
        if rendered:
            head, tail = self.frame(record)
            row["backtrack"] = record.backtrack
            row["prompt"] = head + part1 + injection.inserted
            row["completion"] = control + continuation + tail
        return row

    def generator_column(self, record: Record, **override: Any) -> dict[str, Any]:
        """The ``generator`` column: the recipe's generator, the record's seed (``override`` wins)."""
        return generator_column(self.resources.generator, record.seed, **override)

    # -- control signal --------------------------------------------------------------------------
    @classmethod
    def control_format(cls, recipe: Recipe) -> str | None:
        """The control signal's format (``{category}``, ``{x}``), or None for a method without one."""
        control = getattr(recipe, "control", None)
        return None if control is None else control.format

    def control(self, record: Record) -> str:
        """The record's control signal: its category and X for the primary tokenizer."""
        fmt = self.control_format(self.recipe)
        assert fmt is not None and record.injection is not None
        return control_text(fmt, record.injection.category, record.backtrack[0]["tokens"])

    @classmethod
    def control_example(cls, recipe: Recipe) -> str:
        """The control signal with placeholders (``[CATEGORY c][BACKTRACK_BY_X]``), for the card."""
        fmt = cls.control_format(recipe)
        return "" if fmt is None else control_text(fmt, "c", "X")

    @classmethod
    def control_patterns(cls, recipe: Recipe) -> list[str]:
        """Regexes of the control atoms, which must not occur in source or generated text."""
        fmt = cls.control_format(recipe)
        return [] if fmt is None else control_patterns(fmt)

    @classmethod
    def control_vocabulary(cls, recipe: Recipe, max_x: dict[str, int]) -> list[str]:
        """Every control atom the dataset can contain (each category's atoms, X from 1 to the
        largest X any recorded tokenizer needs): the special tokens a trainer adds."""
        fmt = cls.control_format(recipe)
        if fmt is None:
            return []
        return control_vocabulary(fmt, recipe.categories, max(max_x.values(), default=1))

    @classmethod
    def manifest_fields(cls, recipe: Recipe) -> dict[str, Any]:
        """Method-specific manifest entries (default: the control format)."""
        fmt = cls.control_format(recipe)
        return {} if fmt is None else {"control_format": fmt}

    # -- dataset-level hooks ---------------------------------------------------------------------
    @classmethod
    def extra_rows(cls, row: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Rows of the extra configs derived from one kept row (config -> rows, same split).

        Called by ``emit`` for every kept row, so build, the dedupe pass and refilter (which
        rebuild chunks from stored rows) derive the same extra rows. Default: none."""
        return {}

    @classmethod  # noqa: B027 - optional hook
    def finish_row(cls, row: dict[str, Any]) -> None:
        """Complete a row before it is emitted (default: nothing; a method with other columns
        fills their defaults here, for rows of rejected sources too)."""

    @classmethod
    def count_row(cls, stats: ChunkStats, row: dict[str, Any]) -> None:
        """Counters of a kept row: for a row with an injection, what ``counts`` names."""
        injection = row["injection"]
        if not injection or not cls.counts:
            return
        if "categories" in cls.counts:
            stats.count("categories", injection["category"])
        if "positions" in cls.counts:
            stats.observe("positions", round(float(injection["relative_position"]), 4))
        if "backtrack" in cls.counts:
            for entry in row["backtrack"]:
                stats.observe("backtrack", entry["tokens"], entry["tokenizer"])

    @classmethod
    def plots(cls, out_dir: Path, stats: ChunkStats) -> list[str]:
        """Write the method's plots into ``out_dir/plots``; their paths relative to ``out_dir``."""
        return []

    @classmethod
    def card_context(cls, recipe: Recipe, manifest: dict[str, Any], stats: ChunkStats) -> dict[str, Any]:
        """Variables of the method's card sections (``data_cards/methods/NAME.md.j2``)."""
        return {}

    @classmethod
    def order_key(cls, row: dict[str, Any], position: int) -> tuple[Any, ...]:
        """Where a stored row sat in its chunk (``position`` = its source row's place in the run):
        rejected source rows first, then rows in source order, by id or variant (``row_order``)."""
        source_level = not row["segments"]
        if cls.row_order != "variant":
            return (0 if source_level else 1, position, row["id"])
        match = _VARIANT.search(row["id"])
        variant = int(match.group(1)) if match and not source_level else -1
        return (0 if source_level else 1, position, variant)

    @classmethod
    def relabel(cls, recipe: Recipe, row: dict[str, Any], category: str) -> None:
        """Give a stored row another category (refilter's ``category_mismatch: relabel``)."""
        raise NotImplementedError(f"method {cls.name!r} has no categories to relabel")

    # -- source rows -----------------------------------------------------------------------------
    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of a block to ``timings[stage]``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] += time.perf_counter() - started

    def prepare(self, items: Sequence[SourceItem], out: ChunkOutput) -> list[Record]:
        """Reject unusable source rows into ``out``; check, segment and plan the others."""
        convs: list[Conversation] = []
        for item in items:
            if isinstance(item, SourceReject):
                self._reject_source(out, item, item.reason, item.detail)
                continue
            problem = hygiene.source_problem(item.context, item.response, self.recipe.limits)
            if problem is None:
                problem, item = self._control_strings(item)
            if problem is not None:
                self._reject_source(out, item, *problem)
            else:
                convs.append(item)
        spans = self._segment(convs)
        records: list[Record] = []
        for conv, conv_spans in zip(convs, spans, strict=True):
            if isinstance(conv_spans, str):
                self._reject_source(out, conv, "row_error", conv_spans)
                continue
            reason = self.source_reason(conv, conv_spans)
            if reason:
                self._reject_source(out, conv, reason, "")
                continue
            records.extend(self.plan(conv, conv_spans))
        return records

    def _reject_source(self, out: ChunkOutput, item: SourceItem, reason: str, detail: str) -> None:
        if reason == "invalid_text":  # keep what can be kept; parquet cannot hold lone surrogates
            fixed = tuple((role, hygiene.replace_invalid(c)) for role, c in item.context)
            item = replace(item, context=fixed, response=hygiene.replace_invalid(item.response))
        self.emit(out, rejected_row(base_row(item, self.source_key(item)), [reason], detail), None)

    def _control_strings(self, conv: Conversation) -> tuple[tuple[str, str] | None, Conversation]:
        """(problem, conversation): reject, or escape, control strings in the source turns."""
        texts = [(f"context turn {i}", c) for i, (_, c) in enumerate(conv.context)]
        found = hygiene.first_match(self.controls, [*texts, ("the answer", conv.response)])
        if found is None:
            return None, conv
        if self.recipe.limits.control_strings == "reject":
            return ("source_contains_control", found), conv
        pattern = self.controls
        context = tuple((role, hygiene.escape(c, pattern)) for role, c in conv.context)
        return None, replace(conv, context=context, response=hygiene.escape(conv.response, pattern))

    def _segment(self, convs: list[Conversation]) -> list[list[tuple[int, int]] | str]:
        """Sentence spans per answer; an answer spaCy fails on gets the error text instead."""
        nlp = self.resources.nlp
        try:
            return list(sentence_spans(nlp, [c.response for c in convs]))
        except Exception:  # one bad answer must not stop the chunk: find it
            out: list[list[tuple[int, int]] | str] = []
            for conv in convs:
                try:
                    out.extend(sentence_spans(nlp, [conv.response]))
                except Exception as exc:
                    out.append(error_detail("segment", exc))
            return out

    @cached_property
    def controls(self) -> re.Pattern[str] | None:
        """One regex for the control atoms and every tokenizer's special-token strings."""
        return hygiene.control_regex(self.control_patterns(self.recipe), self.tokenizers)

    def _check_generated(self, records: Sequence[Record]) -> None:
        """Reject (or escape) generated text that is too long, invalid or holds control strings."""
        for record in records:
            injection = record.injection
            if injection is None or not record.live:
                continue
            problem = hygiene.generated_problem(injection.inserted, self.recipe.limits)
            if problem is not None:
                record.reject(*problem)
                continue
            texts = [("steering", injection.steering), ("violation", injection.violation)]
            found = hygiene.first_match(self.controls, texts)
            if found is None:
                continue
            if self.recipe.limits.control_strings == "reject":
                record.reject("generated_contains_control", found)
            else:
                injection.steering = hygiene.escape(injection.steering, self.controls)
                injection.violation = hygiene.escape(injection.violation, self.controls)

    def isolated(self, stage: str, run: Callable[[list[Record]], Any], records: list[Record]) -> None:
        """``run(records)``; when it fails, again one record at a time, rejecting the failing ones
        with ``row_error`` (fatal endpoint errors still stop the build)."""
        try:
            run(records)
        except FatalEndpointError:
            raise
        except Exception:
            for record in records:
                if not record.live:
                    continue
                try:
                    run([record])
                except FatalEndpointError:
                    raise
                except Exception as exc:
                    record.reject("row_error", error_detail(stage, exc))

    # -- emitting --------------------------------------------------------------------------------
    def emit_records(self, out: ChunkOutput, records: Sequence[Record]) -> None:
        """Build every record's row and emit it, kept or rejected (a failing build_row is row_error)."""
        for record in records:
            out.stats.repaired += record.repaired
            try:
                row = self.build_row(record)
            except Exception as exc:
                record.reject("row_error", error_detail("rows", exc))
                row = base_row(record.conv, record.row_id)
            if record.reasons:
                self.emit(out, rejected_row(row, record.reasons, record.detail), None, record.transient)
            else:
                self.emit(out, row, record.split)

    @classmethod
    def new_output(cls) -> ChunkOutput:
        """An empty chunk with this method's extra configs."""
        out = ChunkOutput(extra_features=dict(cls.extra_configs))
        out.extra = {name: {"train": [], "test": []} for name in cls.extra_configs}
        return out

    @classmethod
    def emit(cls, out: ChunkOutput, row: dict[str, Any], split: str | None, transient: bool = False) -> None:
        """Add a finished row to the chunk (kept in ``split``, or rejected) and count it;
        ``transient`` rejections make the chunk unfinished, so a re-run retries them."""
        cls.finish_row(row)
        if transient:
            out.stats.transient += 1
        if split is None:
            row.setdefault("detail", "")
            out.rejected.append(row)
        else:
            out.kept[split].append(row)
            cls.count_row(out.stats, row)
            for config, derived in cls.extra_rows(row).items():
                out.extra.setdefault(config, {"train": [], "test": []})[split].extend(derived)
        out.stats.emitted(row, split)

    @classmethod
    def chunk_from_rows(cls, rows: list[dict[str, Any]], split_of: dict[str, str]) -> ChunkOutput:
        """A chunk rebuilt from stored rows (refilter, dedupe): rows with ``reasons`` are rejected,
        the others kept in ``split_of[row id]``; counters recomputed."""
        out = cls.new_output()
        for row in rows:
            if row.get("reasons"):
                cls.emit(out, row, None)
            else:
                row.pop("reasons", None)
                row.pop("detail", None)
                cls.emit(out, row, split_of[row["id"]])
        return out

    def generation_requests(self, items: Sequence[SourceItem]) -> tuple[list[GenerationRequest], int]:
        """The generator requests a chunk would make, and how many rows it rejects before that."""
        out = self.new_output()
        records = [r for r in self.prepare(items, out) if r.live]
        requests = [request for r in records if (request := self.request(r)) is not None]
        return requests, len(out.rejected)
