"""The flow: every record of the chunks in flight moves through its method's steps on its own.

``Flow.add(index, items)`` prepares a chunk (hygiene, segmentation, planning: CPU, here) and puts
its records at the first step; ``Flow.pump(timeout)`` moves every record as far as it can go and
returns the chunks whose last record is done. A step that asks for model calls (``stages.step``)
submits the record's remote tasks to the engine at once (priority: the chunk's index, so older
chunks are served first) and queues its local tasks, which run as one batch per function with every
other record waiting for them; the record moves on when all its results are in. So each endpoint is
busy as long as any record anywhere needs it: a record's classifier requests leave as soon as its
generated text exists, and the next chunk's requests while this one's tail is answered.

The error budget: every step that is ``budgeted`` (generator requests) counts, per chunk, the
records that asked and those whose request failed for good (``generator_error``); beyond
``generator.max_error_fraction`` (and at least 5 failures) the flow raises ``EndpointDown``. The
check runs on every failure against the most records the chunk could still ask for, so it trips as
early as the whole chunk's count allows.
"""

from __future__ import annotations

import queue
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from bsafe_data.errors import BuildError
from bsafe_data.llm.breaker import QualityStop
from bsafe_data.llm.engine import Engine
from bsafe_data.llm.errors import FatalEndpointError
from bsafe_data.methods.base import ChunkOutput, Method, error_detail
from bsafe_data.sources import SourceItem
from bsafe_data.stages.record import Record
from bsafe_data.stages.step import Local, Step, Task

#: A chunk needs this many failed requests before the error budget can stop the build.
BUDGET_MIN_FAILURES = 5
_ERROR_KIND = re.compile(
    r"HTTP \d+|timeout|connection error|malformed response|not run|batch (?:line )?[a-z_]+"
)


class EndpointDown(BuildError):
    """The generator endpoint fails beyond ``generator.max_error_fraction``: stop the build."""


@dataclass
class _Budget:
    """A budgeted step's counts in one chunk."""

    asked: int = 0
    passed: int = 0
    failed: list[str] = field(default_factory=list)  # details of the failed requests


@dataclass
class _Chunk:
    index: int
    out: ChunkOutput
    records: list[Record]
    left: int
    budgets: dict[int, _Budget] = field(default_factory=dict)


@dataclass(eq=False)
class _Track:
    """A record on its way: its chunk, its step, and the results it waits for."""

    record: Record
    chunk: _Chunk
    step: int = 0
    results: list[Any] = field(default_factory=list)
    left: int = 0
    asked: bool = False
    failed: bool = False  # a task of this step raised: the record is rejected, its results void


class Flow:
    """The records of the chunks in flight and the steps they are at (see the module docstring)."""

    def __init__(self, method: Method, engine: Engine | None = None):
        self.method = method
        self.engine = engine
        self.steps: list[Step] = method.steps()
        if not self.steps:
            raise ValueError(f"method {method.name!r} has no steps")
        self._ready: list[list[_Track]] = [[] for _ in self.steps]
        self._local: dict[Callable[[list[Any]], list[Any]], list[tuple[_Track, int, Any]]] = {}
        self._answers: queue.SimpleQueue[tuple[_Track, int, Future[Any]]] = queue.SimpleQueue()
        self._remote = 0  # remote tasks whose answer has not been taken yet
        self._finished: list[tuple[int, ChunkOutput]] = []
        self.chunks: dict[int, _Chunk] = {}
        #: records added and not yet done
        self.unfinished = 0

    # -- chunks ----------------------------------------------------------------------------------
    def add(self, index: int, items: Sequence[SourceItem]) -> int:
        """Prepare chunk ``index`` and start its records; returns how many records it has."""
        method = self.method
        out = method.new_output()
        out.stats.source_rows = len(items)
        with method.timed("segment"):
            records = method.prepare(items, out)
        chunk = self.chunks[index] = _Chunk(index, out, records, len(records))
        self.unfinished += len(records)
        self._ready[0].extend(_Track(r, chunk) for r in records)
        if not records:
            self._finish(chunk)
        return len(records)

    def pump(self, timeout: float = 0.0) -> list[tuple[int, ChunkOutput]]:
        """Move every record as far as it can go; when none can and answers are outstanding, wait
        up to ``timeout`` seconds for one. The chunks finished meanwhile, in finishing order."""
        if not self._advance() and self._remote and timeout > 0:
            if self.engine is not None:
                self.engine.idle()  # nothing moves until answers come: a batch round may be due
            started = time.perf_counter()
            try:
                item = self._answers.get(timeout=timeout)
            except queue.Empty:
                item = None
            self.method.timings["waiting"] += time.perf_counter() - started
            if item is not None:
                self._take(*item)
                self._advance()
        finished, self._finished = self._finished, []
        return finished

    def run(self, index: int, items: Sequence[SourceItem]) -> ChunkOutput:
        """Process one chunk to the end (for callers without a chunk loop)."""
        self.add(index, items)
        while True:
            for done, out in self.pump(0.5):
                if done == index:
                    return out

    # -- moving records --------------------------------------------------------------------------
    def _advance(self) -> bool:
        """Run what can run now; True when anything moved."""
        moved = False
        while True:
            progress = self._collect()
            progress = self._run_local() or progress
            for i, step in enumerate(self.steps):
                batch, self._ready[i] = self._ready[i], []
                if not batch:
                    continue
                progress = True
                if step.run is not None:
                    with self.method.timed(step.name):
                        self.method.isolated(step.name, step.run, [t.record for t in batch])
                    for track in batch:
                        self._next(track)
                else:
                    for track in batch:
                        self._ask(track, i, step)
            if not progress:
                return moved
            moved = True

    def _ask(self, track: _Track, index: int, step: Step) -> None:
        record = track.record
        tasks: list[Task] = []
        if record.live:
            assert step.ask is not None
            try:
                tasks = step.ask(record)
            except FatalEndpointError:
                raise
            except Exception as exc:
                record.reject("row_error", error_detail(step.name, exc))
        track.asked = bool(tasks)
        if step.budgeted and tasks:
            track.chunk.budgets.setdefault(index, _Budget()).asked += 1
        if not tasks:
            self._apply(track, [])
            return
        track.results, track.left = [None] * len(tasks), len(tasks)
        for slot, task in enumerate(tasks):
            if isinstance(task, Local):
                self._local.setdefault(task.fn, []).append((track, slot, task.arg))
                continue
            if self.engine is None:
                raise BuildError(f"step {step.name!r} asked for a model call but the flow has no engine")
            future = self.engine.submit(task.call, priority=track.chunk.index)
            self._remote += 1
            future.add_done_callback(lambda f, t=track, s=slot: self._answers.put((t, s, f)))

    def _collect(self) -> bool:
        """Take every answer that has arrived; True if any."""
        took = False
        while True:
            try:
                item = self._answers.get_nowait()
            except queue.Empty:
                return took
            self._take(*item)
            took = True

    def _take(self, track: _Track, slot: int, future: Future[Any]) -> None:
        self._remote -= 1
        try:
            result = future.result()
        except (FatalEndpointError, QualityStop):
            raise
        except Exception as exc:  # a client's bug: that record only
            self._fail(track, exc)
            result = None
        self._deliver(track, slot, result)

    def _fail(self, track: _Track, exc: BaseException) -> None:
        if not track.failed:  # the first failing task of the step says why
            track.failed = True
            track.record.reject("row_error", error_detail(self.steps[track.step].name, exc))

    def _run_local(self) -> bool:
        """Run every queued local task, one batch per function; True if any ran."""
        if not self._local:
            return False
        pending, self._local = self._local, {}
        for fn, entries in pending.items():
            name = self.steps[entries[0][0].step].name
            with self.method.timed(name):
                results = _batch(fn, [arg for _, _, arg in entries])
            for (track, slot, _), result in zip(entries, results, strict=True):
                if isinstance(result, _Failed):
                    self._fail(track, result.error)
                    result = None
                self._deliver(track, slot, result)
        return True

    def _deliver(self, track: _Track, slot: int, result: Any) -> None:
        track.results[slot] = result
        track.left -= 1
        if track.left == 0:
            results, track.results = track.results, []
            failed, track.failed = track.failed, False
            self._apply(track, [] if failed else results)

    def _apply(self, track: _Track, results: list[Any]) -> None:
        step = self.steps[track.step]
        record = track.record
        assert step.apply is not None
        try:
            with self.method.timed(step.name):
                step.apply(record, results)
        except FatalEndpointError:
            raise
        except Exception as exc:
            record.reject("row_error", error_detail(step.name, exc))
        if step.budgeted:
            self._count(track)
        self._next(track)

    def _count(self, track: _Track) -> None:
        """The error budget of a budgeted step (see the module docstring)."""
        chunk, record = track.chunk, track.record
        budget = chunk.budgets.setdefault(track.step, _Budget())
        budget.passed += 1
        if track.asked and "generator_error" in record.reasons:
            budget.failed.append(record.detail)
        elif budget.passed < len(chunk.records) or not budget.failed:
            return
        most = budget.asked + len(chunk.records) - budget.passed  # the most that can have asked
        allowed = self.method.recipe.generator.max_error_fraction
        failed = len(budget.failed)
        if failed >= BUDGET_MIN_FAILURES and failed > allowed * most:
            kinds = Counter(_error_kind(detail) for detail in budget.failed)
            summary = ", ".join(f"{kind} ×{n}" for kind, n in kinds.most_common())
            endpoint = self.method.resources.generator.endpoint
            raise EndpointDown(
                f"generator endpoint {endpoint} is failing: {failed} of {most} requests of a chunk "
                f"failed for good ({summary}); over generator.max_error_fraction={allowed:g}. "
                "Finished chunks and cached answers are kept: re-run when the endpoint is back"
            )

    def _next(self, track: _Track) -> None:
        track.step += 1
        if track.step < len(self.steps):
            self._ready[track.step].append(track)
        else:
            self._done_one(track.chunk)

    def _done_one(self, chunk: _Chunk) -> None:
        self.unfinished -= 1
        chunk.left -= 1
        if chunk.left == 0:
            self._finish(chunk)

    def _finish(self, chunk: _Chunk) -> None:
        del self.chunks[chunk.index]
        with self.method.timed("rows"):
            self.method.emit_records(chunk.out, chunk.records)
        self._finished.append((chunk.index, chunk.out))


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def _batch(fn: Callable[[list[Any]], list[Any]], args: list[Any]) -> list[Any]:
    """``fn`` on the distinct ``args``, mapped back; when it fails, one argument at a time (the
    failing ones get ``_Failed``)."""
    try:
        unique = list(dict.fromkeys(args))
    except TypeError:  # unhashable arguments: no sharing
        unique = args
    try:
        results = fn(unique)
        if unique is args:
            return results
        by_arg = dict(zip(unique, results, strict=True))
        return [by_arg[arg] for arg in args]
    except FatalEndpointError:
        raise
    except Exception:
        out: list[Any] = []
        for arg in args:
            try:
                out.extend(fn([arg]))
            except FatalEndpointError:
                raise
            except Exception as exc:
                out.append(_Failed(exc))
        return out


def _error_kind(detail: str) -> str:
    found = _ERROR_KIND.search(detail)
    return found.group(0) if found else "error"
