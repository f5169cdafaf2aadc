"""The Method interface: what a data-construction method declares and the hooks it implements.

A method turns source conversations into rows. It declares its recipe model (a subclass of
``Recipe`` with ``method: Literal[NAME]``), its row kinds and loss segments, and implements small
hooks; ``Method.process`` (= ``start`` then the call it returns) runs the shared stages around
them, in this order::

    segment → plan (hook) → generate (hooks request / apply_generation) → label (hook: X)
            → classify (hook items_of; judges first, hook on_judge) → rules → rows (hook build_row)

Dataset-wide duplicate detection runs after all chunks (``stages.dedupe``). Adding a method is one
module with a ``Method`` subclass decorated with ``@register_method``, one recipe and its tests;
``pipeline.build``, ``plan`` and ``refilter`` find it from the recipe's ``method``.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any, ClassVar

import datasets

from bsafe_data.classify.base import Classifier, Item, Score
from bsafe_data.classify.rules import RuleSet
from bsafe_data.errors import BuildError
from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.llm.errors import FatalEndpointError
from bsafe_data.recipe import Recipe, register_recipe
from bsafe_data.rows import ROW_FEATURES
from bsafe_data.sources import Conversation, SourceItem, SourceReject
from bsafe_data.stages import classify as classify_stage
from bsafe_data.stages import count as count_stage
from bsafe_data.stages import generate as generate_stage
from bsafe_data.stages import hygiene
from bsafe_data.stages import rules as rules_stage
from bsafe_data.stages.record import Record
from bsafe_data.stages.rows import base_row, rejected_row
from bsafe_data.stages.sample import row_seed, split_of
from bsafe_data.stages.segment import sentence_spans
from bsafe_data.stages.stats import ChunkStats

#: A chunk needs this many failed requests before the error budget can stop the build.
_BREAKER_MIN_FAILURES = 5
_ERROR_KIND = re.compile(r"HTTP \d+|timeout|connection error|malformed response|not run")


#: finishes a chunk that ``Method.start`` began (its generator requests may still be in flight)
ChunkFinish = Callable[[], "ChunkOutput"]

#: Records per finish group (whole conversations: a group ends at the first conversation boundary
#: after this many). A fixed number, never derived from timing or the worker count, so a chunk's
#: classifier batches, and its rows, are the same however its answers arrive.
FINISH_GROUP_RECORDS = 256


@dataclass
class FinishGroup:
    """Consecutive records of a chunk, finished together once their generator answers are in."""

    records: list[Record]
    wanted: list[Record]  # the records waiting for a generator answer
    answers: Future[list[Generation]] | None  # the answers of ``wanted``, in order
    sent: threading.Event  # set once every request of ``wanted`` has left


def finish_groups(records: list[Record], size: int = FINISH_GROUP_RECORDS) -> list[list[Record]]:
    """``records`` cut into consecutive groups of at least ``size`` records (the last may be
    smaller), never between two records of one conversation."""
    groups: list[list[Record]] = []
    current: list[Record] = []
    for record in records:
        if len(current) >= size and record.conv.ref != current[-1].conv.ref:
            groups.append(current)
            current = []
        current.append(record)
    if current:
        groups.append(current)
    return groups


class EndpointDown(BuildError):
    """The generator endpoint fails beyond ``generator.max_error_fraction``: stop the build."""


def error_detail(stage: str, exc: BaseException) -> str:
    """``stage: ErrorType: message`` (shortened) for a row's ``detail``."""
    return f"{stage}: {type(exc).__name__}: {exc}"[:300]


def _error_kind(detail: str) -> str:
    found = _ERROR_KIND.search(detail)
    return found.group(0) if found else "error"


#: method name -> Method class (``register_method``); the package's own are imported lazily.
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``method: cls.name`` buildable (and its recipe model parseable)."""
    if cls.recipe_model.model_fields["method"].default != cls.name:
        raise ValueError(f"{cls.recipe_model.__name__}.method must default to {cls.name!r}")
    METHODS[cls.name] = cls
    register_recipe(cls.recipe_model)
    return cls


def method_class(recipe: Recipe | str) -> type[Method]:
    """The Method class for a recipe (or a method name)."""
    import bsafe_data.methods  # noqa: F401 - registers the package's own methods

    name = recipe if isinstance(recipe, str) else recipe.method
    try:
        return METHODS[name]
    except KeyError:
        raise BuildError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})") from None


@dataclass
class Resources:
    """What a worker loads once: spaCy, tokenizers (primary first), generator, classifiers.

    ``close`` releases what was opened here (a generator passed in by the caller stays open).
    """

    nlp: Any
    tokenizers: dict[str, Any]
    generator: Generator
    classifiers: list[Classifier] = field(default_factory=list)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    #: the LLM response cache folder of the build (for methods that send requests of their own)
    cache_dir: Path | None = None
    #: usage counters of the clients a method opened itself (``adopt``), by name
    _adopted: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls, recipe: Recipe, cache_dir: Path | None = None, generator: Generator | None = None
    ) -> Resources:
        """Load everything ``recipe`` names; unloadable parts raise BuildError with the reason."""
        from bsafe_data.classify.factory import make_classifiers
        from bsafe_data.generate.factory import make_generator
        from bsafe_data.stages.segment import load_nlp
        from bsafe_data.tokenization import load_tokenizer

        stack = ExitStack()
        try:
            tokenizers = {ref: load_tokenizer(ref) for ref in recipe.tokenizers.all}
            nlp = load_nlp(recipe.segmentation.spacy_model)
            if generator is None:
                generator = make_generator(recipe.generator, cache_dir=cache_dir)
                stack.callback(generator.close)
            classifiers = make_classifiers(recipe, cache_dir)
            for classifier in classifiers:
                stack.callback(classifier.close)
        except Exception as exc:  # TokenizerLoadError, SegmentationError, GeneratorUnavailable, ...
            stack.close()  # all carry readable messages
            raise BuildError(str(exc)) from None
        return cls(nlp, tokenizers, generator, classifiers, stack, cache_dir)

    def close(self) -> None:
        """Close the generator and classifiers this object opened."""
        self._stack.close()

    def close_later(self, close: Callable[[], None]) -> None:
        """Run ``close`` when these resources close (for clients a method opens itself)."""
        self._stack.callback(close)

    def adopt(self, name: str, close: Callable[[], None], usage: Callable[[], dict[str, Any]]) -> None:
        """A client a method opened itself (e.g. a companion-text writer): closed with these
        resources, its usage counters reported as ``name`` in ``usage()``."""
        self.close_later(close)
        self._adopted[name] = usage

    def usage(self) -> dict[str, dict[str, Any]]:
        """Usage counters of every client, by name: ``generator``, ``classifier:NAME`` and the
        adopted ones (requests, cache hits, tokens, ... as each client counts them)."""
        clients = {"generator": dict(self.generator.usage)}
        clients.update({f"classifier:{c.name}": dict(c.usage) for c in self.classifiers})
        clients.update({name: dict(usage()) for name, usage in self._adopted.items()})
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
    """Base of every method: shared identities, splits and stage order; hooks for the rest."""

    #: the ``method`` value of its recipes
    name: ClassVar[str]
    #: its recipe model (``method: Literal[name]`` plus the method's own sections)
    recipe_model: ClassVar[type[Recipe]]
    #: the values of the ``kind`` column it produces
    kinds: ClassVar[tuple[str, ...]]
    #: the segment kinds trained on (``loss`` true)
    loss_segments: ClassVar[tuple[str, ...]]
    #: extra configs (name -> schema) whose rows ``extra_rows`` derives from kept rows (e.g. DPO
    #: pairs); written as ``NAME/{split}-….parquet`` next to ``data/`` and ``rejected/``
    extra_configs: ClassVar[dict[str, datasets.Features]] = {}
    #: the columns of its rows (``rows.ROW_FEATURES``; the rejected config adds reasons and detail)
    features: ClassVar[datasets.Features] = ROW_FEATURES

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

    # -- identities (shared) ------------------------------------------------------------------
    def source_key(self, item: SourceItem) -> str:
        """The id of a source row (prefixed with its dataset when the recipe has several sources)."""
        ref = item.ref
        return f"{ref.dataset}:{ref.id}" if self.multi_source else ref.id

    def split_of(self, dataset: str, source_id: str) -> str:
        """train/test by source row, so no answer appears in both splits."""
        return split_of(self.recipe.seed, self.recipe.split.test_fraction, dataset, source_id)

    def record_seed(self, conv: Conversation, variant: int) -> int:
        """The seed of one row: from (recipe seed, source row, variant), independent of order."""
        return row_seed(self.recipe.seed, conv.ref.dataset, conv.ref.id, variant)

    # -- hooks ----------------------------------------------------------------------------------
    def source_reason(self, conv: Conversation, spans: list[tuple[int, int]]) -> str | None:
        """A reason code when a usable conversation still cannot serve this method (default none)."""
        return None

    @abstractmethod
    def plan(self, conv: Conversation, spans: list[tuple[int, int]]) -> list[Record]:
        """The records (future rows) of one source conversation."""

    def needs_generation(self, record: Record) -> bool:
        """True when the record needs a generator answer (default: never)."""
        return False

    def request(self, record: Record) -> GenerationRequest:
        """The generator request of a record that needs one."""
        raise NotImplementedError(f"method {self.name!r} makes no generator requests")

    def apply_generation(self, record: Record, generation: Generation) -> None:
        """Take a usable generator answer into the record."""
        raise NotImplementedError(f"method {self.name!r} makes no generator requests")

    def label(self, records: list[Record]) -> int:
        """Token bookkeeping (chat frames; X for methods that backtrack). Returns repaired count."""
        count_stage.frame(self.tokenizers, records)
        return 0

    def items_of(self, record: Record, targets: Sequence[str]) -> list[Item]:
        """The spans of a record a classifier with these targets scores."""
        return classify_stage.span_items(record, targets)

    def on_judge(self, verdicts: list[tuple[Record, Item, Score]]) -> None:  # noqa: B027 - optional hook
        """React to the verdicts of span-adjusting judges (default: nothing)."""

    @abstractmethod
    def build_row(self, record: Record) -> dict[str, Any]:
        """The row of the row contract for a record (reasons are added by the caller)."""

    @classmethod
    def extra_rows(cls, row: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Rows of the extra configs derived from one kept row (config -> rows, same split).

        Called by ``emit`` for every kept row, so build, the dedupe pass and refilter (which
        rebuild chunks from stored rows) derive the same extra rows. Default: none."""
        return {}

    @classmethod
    def new_output(cls) -> ChunkOutput:
        """An empty chunk with this method's extra configs."""
        out = ChunkOutput(extra_features=dict(cls.extra_configs))
        out.extra = {name: {"train": [], "test": []} for name in cls.extra_configs}
        return out

    @classmethod  # noqa: B027 - optional hook
    def count_row(cls, stats: ChunkStats, row: dict[str, Any]) -> None:
        """Method-specific counters of a kept row (categories, positions, X)."""

    @classmethod
    def plots(cls, out_dir: Path, stats: ChunkStats) -> list[str]:
        """Write the method's plots into ``out_dir/plots``; their paths relative to ``out_dir``."""
        return []

    @classmethod
    def control_patterns(cls, recipe: Recipe) -> list[str]:
        """Regexes of the method's control atoms, which must not occur in source or generated text."""
        return []

    @classmethod
    def card_context(cls, recipe: Recipe, manifest: dict[str, Any], stats: ChunkStats) -> dict[str, Any]:
        """Variables of the method's card sections (``data_cards/methods/NAME.md.j2``)."""
        return {}

    @classmethod
    def manifest_fields(cls, recipe: Recipe) -> dict[str, Any]:
        """Method-specific manifest entries (e.g. the control format)."""
        return {}

    @classmethod
    def control_vocabulary(cls, recipe: Recipe, max_x: dict[str, int]) -> list[str]:
        """The control atoms a trainer adds as special tokens (``max_x``: largest X per tokenizer)."""
        return []

    @classmethod
    def order_key(cls, row: dict[str, Any], position: int) -> tuple[Any, ...]:
        """Where a stored row sat in its chunk (``position`` = its source row's place in the run).

        Rejected source rows come first, then rows in source order (default: ordered by id)."""
        source_level = not row["segments"]
        return (0 if source_level else 1, position, row["id"])

    @classmethod
    def relabel(cls, recipe: Recipe, row: dict[str, Any], category: str) -> None:
        """Give a stored row another category (refilter's ``category_mismatch: relabel``)."""
        raise NotImplementedError(f"method {cls.name!r} has no categories to relabel")

    # -- the flow ------------------------------------------------------------------------------
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
        found = hygiene.first_match(self._controls, [*texts, ("the answer", conv.response)])
        if found is None:
            return None, conv
        if self.recipe.limits.control_strings == "reject":
            return ("source_contains_control", found), conv
        pattern = self._controls
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
    def _controls(self) -> re.Pattern[str] | None:
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
            found = hygiene.first_match(self._controls, texts)
            if found is None:
                continue
            if self.recipe.limits.control_strings == "reject":
                record.reject("generated_contains_control", found)
            else:
                injection.steering = hygiene.escape(injection.steering, self._controls)
                injection.violation = hygiene.escape(injection.violation, self._controls)

    def _isolated(self, stage: str, run: Callable[[list[Record]], Any], records: list[Record]) -> None:
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

    def _breaker(self, wanted: Sequence[Record]) -> None:
        """Stop the build when the generator endpoint looks down (error budget exceeded). Every
        failed request counts, transient or refused: an endpoint refusing most requests (a wrong
        parameter, a model that does not exist there) is as broken as one that is down."""
        failed = [r for r in wanted if "generator_error" in r.reasons]
        budget = self.recipe.generator.max_error_fraction
        if len(failed) < _BREAKER_MIN_FAILURES or len(failed) <= budget * len(wanted):
            return
        kinds = Counter(_error_kind(r.detail) for r in failed)
        summary = ", ".join(f"{kind} ×{n}" for kind, n in kinds.most_common())
        raise EndpointDown(
            f"generator endpoint {self.resources.generator.endpoint} is failing: {len(failed)} of "
            f"{len(wanted)} requests of a chunk failed for good ({summary}); over "
            f"generator.max_error_fraction={budget:g}. Finished chunks and cached answers are kept: "
            "re-run when the endpoint is back"
        )

    def process(self, items: Sequence[SourceItem]) -> ChunkOutput:
        """Turn source items into rows; every item ends up kept or rejected."""
        return self.start(items)()

    def start(self, items: Sequence[SourceItem]) -> ChunkFinish:
        """The first half of ``process``: check, segment and plan the chunk and submit its
        generator requests. The requests are in flight when this returns; the returned call
        finishes the chunk (answers, labels, classifiers, rows), so the executor can start chunk
        i+1 before it finishes chunk i and the endpoint stays busy across chunk boundaries.

        The requests go out as one batch per ``FinishGroup`` (in order: the transport serves older
        batches first). The returned call waits until the chunk's last request has left, then
        finishes the groups in order, each as soon as its answers are in: little work is left
        after the chunk's last answer, and none of it competes with the sending of the chunk's
        requests (the event loop shares this process's interpreter lock)."""
        out = self.new_output()
        out.stats.source_rows = len(items)
        with self.timed("segment"):
            records = self.prepare(items, out)
        groups = []
        for group in finish_groups(records):
            wanted = [r for r in group if r.live and self.needs_generation(r)]
            answers, sent = None, threading.Event()
            if wanted:
                with self.timed("generate"):
                    answers = generate_stage.send(self.resources.generator, wanted, self.request, sent)
            groups.append(FinishGroup(group, wanted, answers, sent))
        return partial(self._finish, out, groups)

    def _finish(self, out: ChunkOutput, groups: list[FinishGroup]) -> ChunkOutput:
        wanted = [r for group in groups for r in group.wanted]
        last = next((g for g in reversed(groups) if g.answers is not None), None)
        if last is not None and last.answers is not None:
            with self.timed("generate"):
                generate_stage.wait_sent(last.sent, last.answers)  # served last: then all have left
        for group in groups:
            self._finish_group(out, group, wanted)
        if groups:
            self._breaker(wanted)  # the chunk's budget, checked on every request's outcome
        return out

    def _finish_group(self, out: ChunkOutput, group: FinishGroup, chunk_wanted: list[Record]) -> None:
        records = group.records
        with self.timed("generate"):  # the time spent waiting for answers (not hidden by overlap)
            if group.answers is not None:
                generate_stage.apply_answers(group.wanted, group.answers, self.apply_generation)
                # failures so far against the whole chunk's budget: when this trips, the check on
                # the whole chunk would too (the count only grows), so stop without waiting
                self._breaker(chunk_wanted)
            self._check_generated(records)
        with self.timed("label"):
            repaired: list[int] = []
            self._isolated("label", lambda batch: repaired.append(self.label(batch)), records)
            out.stats.repaired += sum(repaired)
        with self.timed("classify"):
            if self.recipe.filters.enabled and self.resources.classifiers:
                classifiers = self.resources.classifiers

                def score(batch: list[Record]) -> None:
                    classify_stage.classify(classifiers, batch, self.items_of, self.on_judge)

                self._isolated("classify", score, [r for r in records if r.live])
            if self.recipe.filters.enabled:
                rules_stage.apply_rules(self.rules, records)
        self.emit_records(out, records)

    def emit_records(self, out: ChunkOutput, records: Sequence[Record]) -> None:
        """Build every record's row and emit it, kept or rejected (a failing build_row is row_error)."""
        for record in records:
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
    def emit(cls, out: ChunkOutput, row: dict[str, Any], split: str | None, transient: bool = False) -> None:
        """Add a finished row to the chunk (kept in ``split``, or rejected) and count it;
        ``transient`` rejections make the chunk unfinished, so a re-run retries them."""
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

    def generation_requests(self, items: Sequence[SourceItem]) -> tuple[list[GenerationRequest], int]:
        """The generator requests a chunk would make, and how many rows it rejects before that."""
        out = self.new_output()
        records = [r for r in self.prepare(items, out) if r.live and self.needs_generation(r)]
        return [self.request(r) for r in records], len(out.rejected)

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
