"""The local executor: chunks of source rows through a method, finished chunks on disk, resume.

Source rows are cut into chunks of ``output.chunk_rows``; chunk ``i`` belongs to worker
``i % world_size`` (rank/world-size sharding: every worker reads the same stream and processes its
own chunks). Each finished chunk is written atomically into the work folder (a temp folder, then
a rename; ``executor.output`` keeps it beside the dataset folder), with its counters. A killed run
re-run with the same recipe skips finished chunks; the LLM cache covers the unfinished one. A chunk
holding rows that failed for a transient reason (endpoint errors) is processed again on every run
until it has none. Chunks are independent: the dataset-wide duplicate pass runs after all of them
(``dedupe_chunks``). Memory holds one chunk at a time.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from bsafe_data.classify.dedupe import DedupeIndex
from bsafe_data.methods.base import ChunkFinish, ChunkOutput, Method
from bsafe_data.recipe import Recipe
from bsafe_data.rows import ROW_FEATURES, rejected_features
from bsafe_data.sources import SourceItem
from bsafe_data.stages.dedupe import find_duplicates
from bsafe_data.stages.stats import ChunkStats

SPLITS = ("train", "test")
ProgressFn = Callable[[ChunkStats], None]
#: builds the method (and its resources) on a worker; the argument is how many workers split the
#: endpoints' rate and concurrency limits, each loading its share (``Recipe.shared_by``; 1 when
#: the limits are shared through memory instead, as by the processes executor)
LoadFn = Callable[[int], Method]
#: (index, source items to process or None when resumed, counters of a resumed chunk or None)
PlannedChunk = tuple[int, "list[SourceItem] | None", "ChunkStats | None"]


def fingerprint(recipe: Recipe, limit: int | None) -> str:
    """What finished chunks were built from: they are reused only for the same value."""
    return json.dumps({"recipe": recipe.sha256(), "limit": limit})


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


def _write_table(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")


def write_chunk(work: Path, index: int, out: ChunkOutput, features: Features = ROW_FEATURES) -> Path:
    """Write a chunk's rows (columns: the method's ``features``) and counters atomically: the folder
    exists only when complete."""
    final = work / chunk_name(index)
    tmp = work / f"{chunk_name(index)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, rows in out.kept.items():
        _write_table(rows, features.arrow_schema, tmp / f"{split}.parquet")
    _write_table(out.rejected, rejected_features(features).arrow_schema, tmp / "rejected.parquet")
    for config, config_features in out.extra_features.items():  # the method's extra configs
        for split in SPLITS:
            config_rows = out.extra.get(config, {}).get(split, [])
            _write_table(config_rows, config_features.arrow_schema, tmp / f"{config}-{split}.parquet")
    (tmp / "stats.json").write_text(json.dumps(out.stats.to_json()))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


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
    """What the executor did: finished chunk folders in order, their counters, how many resumed."""

    chunks: list[Path]
    stats: list[ChunkStats]
    resumed: int

    def finished(self, path: Path, stats: ChunkStats, progress: ProgressFn | None) -> None:
        """Record a finished (or resumed) chunk, in chunk order, and report it."""
        self.chunks.append(path)
        self.stats.append(stats)
        if progress:
            progress(stats)


class LocalExecutor:
    """Runs a method over chunks in this process; ``load`` builds the method on first use."""

    def __init__(self, recipe: Recipe, work: Path, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.recipe = recipe
        self.work = work
        self.rank = rank
        self.world_size = world_size

    def chunks(self, items: Iterable[SourceItem]) -> Iterator[PlannedChunk]:
        """(index, chunk, None) for this worker's chunks to process; (index, None, stats) for the
        finished ones it resumes."""
        for index, chunk in enumerate(chunked(items, self.recipe.output.chunk_rows)):
            if index % self.world_size != self.rank:
                continue
            done = self.work / chunk_name(index)
            stats = read_chunk_stats(done) if done.exists() else None
            if stats is not None and not stats.transient:  # finished for good: resume it
                yield index, None, stats
            else:  # new, or holding transient failures a re-run retries (cached answers are free)
                yield index, chunk, None

    def run(
        self,
        items: Iterable[SourceItem],
        load: LoadFn,
        progress: ProgressFn | None = None,
    ) -> ChunkRun:
        """Process (or resume) this worker's chunks of ``items``, in order.

        Chunk i+1 is started (its generator requests sent) before chunk i is finished, so the
        endpoint works while this process labels and classifies (``Method.start``).
        """
        method: Method | None = None
        run = ChunkRun([], [], 0)
        started: tuple[int, ChunkFinish] | None = None

        def finish_started() -> None:
            nonlocal started
            if started is not None:
                index, finish = started
                started = None
                assert method is not None
                stats = finish_chunk(method, self.work, index, finish)
                run.finished(self.work / chunk_name(index), stats, progress)

        for index, chunk, stats in self.chunks(items):
            if chunk is None:
                finish_started()  # chunks are recorded in order
                run.resumed += 1
                run.finished(self.work / chunk_name(index), stats, progress)
                continue
            method = method or load(1)
            finish = method.start(chunk)
            finish_started()
            started = (index, finish)
        finish_started()
        return run


def run_chunk(method: Method, work: Path, index: int, chunk: list[SourceItem]) -> ChunkStats:
    """Process one chunk and write it as finished chunk ``index``; its counters."""
    return finish_chunk(method, work, index, method.start(chunk))


def finish_chunk(method: Method, work: Path, index: int, finish: ChunkFinish) -> ChunkStats:
    """Finish a started chunk and write it as finished chunk ``index``; its counters."""
    out = finish()
    with method.timed("write_chunks"):
        write_chunk(work, index, out, method.features)
    return out.stats


def source_ranks(recipe: Recipe) -> dict[str, int]:
    """Each source's place in the recipe (rows sort by (rank, index) within a run)."""
    ranks: dict[str, int] = {}
    for spec in recipe.sources:
        ranks.setdefault(spec.name, len(ranks))
    return ranks


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

    out = ChunkRun([], [], run.resumed)
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
