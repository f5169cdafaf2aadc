"""The local executor: chunks of source rows through a method's flow, finished chunks on disk, resume.

Source rows are cut into chunks of ``output.chunk_rows``; chunk ``i`` belongs to worker
``i % world_size`` (rank/world-size sharding: every worker reads the same stream and processes its
own chunks). A worker keeps chunks in flight in its ``Flow`` (``executor.flow``) until every record of
a chunk is done, admitting the next chunk once fewer than half a chunk's records are still on their
way, so every endpoint stays busy across chunk boundaries; memory holds a bounded number of chunks.
With an endpoint in batch mode it holds up to ``batch.rows_in_flight`` records, so a round of
batches asks for all of them.

Each finished chunk is written atomically into the work folder (a temp folder, then a rename;
``executor.output`` keeps it beside the dataset folder) with its counters and the sha256 of each
file. A killed run re-run with the same recipe skips finished chunks that read back intact and
redoes any other (a damaged chunk is redone, and the run says so); the LLM cache makes redoing cheap.
A chunk holding rows that failed for a transient reason (endpoint errors) is processed again on every
run until it has none. Chunks are independent: the dataset-wide duplicate pass runs after all of
them (``dedupe_chunks``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from bsafe_data.classify.dedupe import DedupeIndex
from bsafe_data.executor.flow import Flow
from bsafe_data.methods.base import ChunkOutput, Method
from bsafe_data.recipe import Recipe
from bsafe_data.rows import ROW_FEATURES, rejected_features
from bsafe_data.sources import SourceItem, source_identities
from bsafe_data.stages.dedupe import find_duplicates
from bsafe_data.stages.stats import ChunkStats

SPLITS = ("train", "test")
#: the work folder's layout; chunks written by another layout are not reused
WORK_FORMAT = 2
#: builds the method (and its resources) on a worker; the argument is how many workers split the
#: endpoints' rate and concurrency limits, each loading its share (``Recipe.shared_by``)
LoadFn = Callable[[int], Method]
#: reads the source rows (each worker of a pool reads them itself)
ReadFn = Callable[[], Iterable[SourceItem]]
#: (index, source items to process or None when resumed, counters of a resumed chunk or None)
PlannedChunk = tuple[int, "list[SourceItem] | None", "ChunkStats | None"]
#: a chunk's files as tables: file stem -> table
ChunkTables = dict[str, pa.Table]
#: records in flight below which the next chunk is admitted (at least; else half a chunk's)
_ADMIT_BELOW = 1024
_MAX_CHUNKS_IN_FLIGHT = 8
_TICK_S = 0.25


@dataclass
class Tick:
    """A worker's progress report: the chunks it finished since its last report (counters, in
    chunk order) and its engine's endpoints (``Engine.snapshot``)."""

    chunks: list[ChunkStats] = field(default_factory=list)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    worker: int = 0


ProgressFn = Callable[[Tick], None]


def fingerprint(recipe: Recipe, limit: int | None) -> str:
    """What finished chunks were built from: they are reused only for the same value."""
    return json.dumps({"recipe": recipe.sha256(), "limit": limit, "work_format": WORK_FORMAT})


def prepare_work_dir(work: Path, recipe: Recipe, limit: int | None) -> Path:
    """The chunk folder ``work`` for this (recipe, limit); chunks of another recipe are discarded."""
    marker = work / "fingerprint.json"
    wanted = fingerprint(recipe, limit)
    if work.exists() and (not marker.exists() or marker.read_text() != wanted):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(wanted)
    return work


def chunked(items: Iterable[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    stream = iter(items)
    while chunk := list(itertools.islice(stream, size)):
        yield chunk


def chunk_name(index: int) -> str:
    """The folder name of chunk ``index``."""
    return f"chunk-{index:06d}"


def chunk_tables(out: ChunkOutput, features: Features = ROW_FEATURES) -> ChunkTables:
    """A chunk's rows as tables, one per file: kept rows per split (columns: the method's
    ``features``), rejected rows, and the extra configs' rows per split."""
    tables = {
        split: pa.Table.from_pylist(rows, schema=features.arrow_schema) for split, rows in out.kept.items()
    }
    tables["rejected"] = pa.Table.from_pylist(out.rejected, schema=rejected_features(features).arrow_schema)
    for config, config_features in out.extra_features.items():
        for split in SPLITS:
            rows = out.extra.get(config, {}).get(split, [])
            tables[f"{config}-{split}"] = pa.Table.from_pylist(rows, schema=config_features.arrow_schema)
    return tables


def write_chunk_tables(work: Path, index: int, tables: ChunkTables, stats: ChunkStats) -> Path:
    """Write a chunk's tables and counters atomically (the folder exists only when complete), with
    the sha256 of every file (``checksums.json``, checked on resume)."""
    final = work / chunk_name(index)
    tmp = work / f"{chunk_name(index)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for stem, table in tables.items():
        pq.write_table(table, tmp / f"{stem}.parquet", compression="zstd")
    (tmp / "stats.json").write_text(json.dumps(stats.to_json()))
    sums = {path.name: _sha256(path) for path in sorted(tmp.iterdir())}
    (tmp / "checksums.json").write_text(json.dumps(sums))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def write_chunk(work: Path, index: int, out: ChunkOutput, features: Features = ROW_FEATURES) -> Path:
    """Write a chunk's rows and counters atomically (see ``write_chunk_tables``)."""
    return write_chunk_tables(work, index, chunk_tables(out, features), out.stats)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chunk_problem(path: Path) -> str | None:
    """Why a finished chunk folder does not read back as written (None when it does)."""
    try:
        sums = json.loads((path / "checksums.json").read_text())
        if not isinstance(sums, dict) or "stats.json" not in sums:
            return "checksums.json is not a list of its files"
        for name, digest in sums.items():
            if _sha256(path / name) != digest:
                return f"{name} changed since it was written"
        read_chunk_stats(path)
    except FileNotFoundError as exc:
        return f"{Path(exc.filename or '?').name} is missing"
    except (OSError, ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def read_chunk_stats(path: Path) -> ChunkStats:
    """The counters saved with a finished chunk."""
    return ChunkStats(**json.loads((path / "stats.json").read_text()))


def read_chunk_rows(path: Path) -> list[tuple[dict[str, Any], str | None]]:
    """(row, split) of a finished chunk; split None for rejected rows."""
    rows: list[tuple[dict[str, Any], str | None]] = []
    for split in (*SPLITS, None):
        file = path / f"{split or 'rejected'}.parquet"
        if file.exists():
            rows.extend((row, split) for row in pq.read_table(file).to_pylist())
    return rows


def read_chunk_extra(path: Path, config: str) -> dict[str, list[dict[str, Any]]]:
    """The rows of extra config ``config`` (``{config}-{split}.parquet``) of a finished chunk, per split."""
    return {
        split: pq.read_table(path / f"{config}-{split}.parquet").to_pylist()
        for split in SPLITS
        if (path / f"{config}-{split}.parquet").exists()
    }


@dataclass
class ChunkRun:
    """What an executor did: finished chunk folders in chunk order, their counters, how many it
    resumed, notes for the user (chunks redone), and the workers' usage and stage timings."""

    chunks: list[Path] = field(default_factory=list)
    stats: list[ChunkStats] = field(default_factory=list)
    resumed: int = 0
    notes: list[str] = field(default_factory=list)
    usage: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)


class LocalExecutor:
    """Runs a method over this worker's chunks in this process; ``load`` builds the method on first use."""

    def __init__(self, recipe: Recipe, work: Path, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.recipe = recipe
        self.work = work
        self.rank = rank
        self.world_size = world_size

    def chunks(self, items: Iterable[SourceItem], notes: list[str] | None = None) -> Iterator[PlannedChunk]:
        """(index, chunk, None) for this worker's chunks to process; (index, None, stats) for the
        finished ones it resumes. A finished chunk that does not read back is redone (a note says so)."""
        for index, chunk in enumerate(chunked(items, self.recipe.output.chunk_rows)):
            if index % self.world_size != self.rank:
                continue
            done = self.work / chunk_name(index)
            if done.exists():
                problem = chunk_problem(done)
                if problem is None:
                    stats = read_chunk_stats(done)
                    if not stats.transient:  # finished for good: resume it
                        yield index, None, stats
                        continue
                elif notes is not None:
                    notes.append(f"chunk {index} of the last run did not read back ({problem}): redone")
            # new, damaged, or holding transient failures a re-run retries (cached answers are free)
            yield index, chunk, None

    def run(self, read: ReadFn, load: LoadFn, progress: ProgressFn | None = None) -> ChunkRun:
        """Process (or resume) this worker's chunks, several in flight; the run lists them in
        chunk order. The method is loaded on the first chunk to process and closed at the end."""
        run = ChunkRun()
        done: dict[int, tuple[Path, ChunkStats]] = {}
        order: list[int] = []
        reporter = _Reporter(progress, self.rank)
        method: Method | None = None
        try:
            flow: Flow | None = None
            admit_below = admit_floor = _ADMIT_BELOW
            max_chunks = _MAX_CHUNKS_IN_FLIGHT
            for index, chunk, stats in self.chunks(read(), run.notes):
                order.append(index)
                if chunk is None:
                    assert stats is not None
                    run.resumed += 1
                    done[index] = (self.work / chunk_name(index), stats)
                    reporter.finished(done, order)
                    continue
                if flow is None:
                    method = load(self.world_size)
                    flow = Flow(method, method.resources.engine)
                    admit_floor, max_chunks = _admission(self.recipe, method)
                admit_below = max(admit_floor, flow.add(index, chunk) // 2)
                self._write(flow.pump(0.0), done, method)  # what runs at once (a whole chunk offline)
                while flow.unfinished > admit_below or len(flow.chunks) >= max_chunks:
                    self._write(flow.pump(_TICK_S), done, method)
                    reporter.finished(done, order, method)
            while flow is not None and flow.chunks:
                self._write(flow.pump(_TICK_S), done, method)
                reporter.finished(done, order, method)
            reporter.finished(done, order, method, force=True)
        finally:
            if method is not None:
                run.usage.append(method.resources.usage())
                run.timings.append(dict(method.timings))
                method.resources.close()
        for index in order:
            path, stats = done[index]
            run.chunks.append(path)
            run.stats.append(stats)
        return run

    def _write(self, finished: list[tuple[int, ChunkOutput]], done: dict[int, tuple[Path, ChunkStats]],
               method: Method | None) -> None:  # fmt: skip
        for index, out in finished:
            assert method is not None
            with method.timed("write_chunks"):
                done[index] = (write_chunk(self.work, index, out, method.features), out.stats)


def _admission(recipe: Recipe, method: Method) -> tuple[int, int]:
    """(records in flight below which the next chunk is admitted, most chunks in flight). With an
    endpoint in batch mode a round of batches asks for every record held: up to
    ``batch.rows_in_flight`` of them."""
    hub = method.resources.engine.batches
    if hub is None or not hub.queues:
        return _ADMIT_BELOW, _MAX_CHUNKS_IN_FLIGHT
    held = recipe.batch.rows_in_flight
    return held, held // recipe.output.chunk_rows + 1


class _Reporter:
    """Reports finished chunks in chunk order, and the engine's endpoints every ``_TICK_S``."""

    def __init__(self, progress: ProgressFn | None, worker: int):
        self.progress = progress
        self.worker = worker
        self.reported = 0
        self.last = 0.0

    def finished(
        self,
        done: dict[int, tuple[Path, ChunkStats]],
        order: list[int],
        method: Method | None = None,
        force: bool = False,
    ) -> None:
        if self.progress is None:
            return
        ready = []
        while self.reported < len(order) and order[self.reported] in done:
            ready.append(done[order[self.reported]][1])
            self.reported += 1
        now = time.monotonic()
        if not ready and not force and now - self.last < _TICK_S:
            return
        self.last = now
        endpoints = method.resources.engine.snapshot() if method is not None else {}
        self.progress(Tick(ready, endpoints, self.worker))


def run_chunk(method: Method, work: Path, index: int, chunk: list[SourceItem]) -> ChunkStats:
    """Process one chunk to the end and write it as finished chunk ``index``; its counters."""
    out = Flow(method, method.resources.engine).run(index, chunk)
    write_chunk(work, index, out, method.features)
    return out.stats


def source_ranks(recipe: Recipe) -> dict[str, int]:
    """Each source's place in the recipe, by its identity (rows sort by (rank, index) within a run)."""
    return {identity.dataset: rank for rank, identity in enumerate(source_identities(recipe.sources))}


def dedupe_chunks(
    work: Path, run: ChunkRun, method: type[Method], recipe: Recipe, index: DedupeIndex
) -> ChunkRun:
    """The dataset-wide duplicate pass over finished chunks, in order.

    Chunks with duplicates are rewritten (duplicates moved to ``rejected`` with their reason) into
    ``work/dedupe/``; the finished chunks themselves stay as they were, so a re-run resumes them.
    """
    if not index.active:
        return run
    ranks = source_ranks(recipe)
    folder = work / "dedupe"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        src = row["source"]
        return method.order_key(row, (ranks.get(src["dataset"], len(ranks)), src["index"]))

    out = ChunkRun(resumed=run.resumed, notes=run.notes, usage=run.usage, timings=run.timings)
    for path, stats in zip(run.chunks, run.stats, strict=True):
        rows = read_chunk_rows(path)
        kept = sorted((row for row, split in rows if split is not None), key=key)
        duplicates = find_duplicates(index, kept)
        if not duplicates:
            out.chunks.append(path)
            out.stats.append(stats)
            continue
        split_of = {row["id"]: split for row, split in rows if split is not None}
        ordered = []
        for row, _ in sorted(rows, key=lambda pair: key(pair[0])):
            if row["id"] in duplicates and not row.get("reasons"):
                row["reasons"] = [duplicates[row["id"]]]
            ordered.append(row)
        rebuilt = method.chunk_from_rows(ordered, split_of)
        rebuilt.stats.source_rows, rebuilt.stats.repaired = stats.source_rows, stats.repaired
        index_no = int(path.name.split("-")[1])
        out.chunks.append(write_chunk(folder, index_no, rebuilt, method.features))
        out.stats.append(rebuilt.stats)
    return out
