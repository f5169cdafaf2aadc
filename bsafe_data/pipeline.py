"""Chunked, resumable build: sources → method → finished chunks on disk → dataset folder.

Each finished chunk is written atomically (temp folder, then rename) under ``OUT/.work/``. A killed
run re-run with the same recipe skips finished chunks (and the LLM cache covers the unfinished
one). Memory holds one chunk at a time.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bsafe_data.generate.base import Generator
from bsafe_data.methods.bsafe_plus import BsafePlusMethod, ChunkOutput
from bsafe_data.recipe import Recipe
from bsafe_data.rows import REJECTED_ARROW_SCHEMA, ROW_ARROW_SCHEMA
from bsafe_data.segment import load_nlp
from bsafe_data.sources import SourceItem, read_sources
from bsafe_data.tokenization import load_tokenizer

WORK_DIR = ".work"
ProgressFn = Callable[[dict[str, Any]], None]


class BuildError(Exception):
    """The build cannot go on (bad source, unloadable tokenizer, fatal endpoint error)."""


@dataclass
class ChunkStats:
    """Counters of one chunk, saved next to its parquet files (so resume needs no re-reading)."""

    source_rows: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    reason_hits: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)
    positions: list[float] = field(default_factory=list)
    backtrack: dict[str, list[int]] = field(default_factory=dict)
    repaired: int = 0

    @classmethod
    def from_output(cls, source_rows: int, out: ChunkOutput) -> ChunkStats:
        """Count what a chunk produced."""
        stats = cls(source_rows=source_rows, repaired=out.repaired)
        stats.kept = {split: len(rows) for split, rows in out.kept.items()}
        stats.rejected = len(out.rejected)
        stats.rejected_by_reason = dict(Counter(r["reasons"][0] for r in out.rejected))
        stats.reason_hits = dict(Counter(reason for r in out.rejected for reason in r["reasons"]))
        kinds: Counter[str] = Counter()
        categories: Counter[str] = Counter()
        for row in itertools.chain(*out.kept.values()):
            kinds[row["kind"]] += 1
            if row["injection"]:
                categories[row["injection"]["category"]] += 1
                stats.positions.append(round(float(row["injection"]["relative_position"]), 4))
                for entry in row["backtrack"]:
                    stats.backtrack.setdefault(entry["tokenizer"], []).append(entry["tokens"])
        stats.kinds, stats.categories = dict(kinds), dict(categories)
        return stats


@dataclass
class BuildResult:
    """Summary of a build; ``funnel`` is what the manifest records."""

    out_dir: Path
    funnel: dict[str, Any]
    counts: dict[str, dict[str, int]]
    stats: ChunkStats
    timings: dict[str, float]
    usage: dict[str, Any]
    resumed_chunks: int


def merge_stats(parts: list[ChunkStats]) -> ChunkStats:
    """Add up chunk counters in chunk order."""
    total = ChunkStats()
    for part in parts:
        total.source_rows += part.source_rows
        total.rejected += part.rejected
        total.repaired += part.repaired
        total.positions.extend(part.positions)
        for attr in ("kept", "rejected_by_reason", "reason_hits", "kinds", "categories"):
            merged = Counter(getattr(total, attr))
            merged.update(getattr(part, attr))
            setattr(total, attr, dict(merged))
        for name, values in part.backtrack.items():
            total.backtrack.setdefault(name, []).extend(values)
    return total


def funnel_of(stats: ChunkStats) -> dict[str, Any]:
    """The manifest funnel: rows in = kept + rejected, rejections by first reason."""
    kept = sum(stats.kept.values())
    return {
        "source_rows": stats.source_rows,
        "rows": kept + stats.rejected,
        "kept": kept,
        "rejected": stats.rejected,
        "rejected_by_reason": dict(sorted(stats.rejected_by_reason.items())),
        "reason_hits": dict(sorted(stats.reason_hits.items())),
        "kept_by_kind": dict(sorted(stats.kinds.items())),
        "repaired_boundaries": stats.repaired,
    }


def _chunks(items: Iterator[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


def _write_table(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")


def _write_chunk(work: Path, index: int, out: ChunkOutput, stats: ChunkStats) -> None:
    final = work / f"chunk-{index:06d}"
    tmp = work / f"chunk-{index:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, rows in out.kept.items():
        _write_table(rows, ROW_ARROW_SCHEMA, tmp / f"{split}.parquet")
    _write_table(out.rejected, REJECTED_ARROW_SCHEMA, tmp / "rejected.parquet")
    (tmp / "stats.json").write_text(json.dumps(stats.__dict__))
    tmp.rename(final)  # atomic: a chunk folder exists only when complete


def _load_chunk_stats(path: Path) -> ChunkStats:
    return ChunkStats(**json.loads((path / "stats.json").read_text()))


def _fingerprint(recipe: Recipe, limit: int | None) -> str:
    return json.dumps({"recipe": recipe.sha256(), "limit": limit})


def prepare_work_dir(out_dir: Path, recipe: Recipe, limit: int | None) -> Path:
    """The chunk folder for this (recipe, limit); stale chunks of another recipe are discarded."""
    work = out_dir / WORK_DIR
    marker = work / "fingerprint.json"
    fingerprint = _fingerprint(recipe, limit)
    if work.exists() and (not marker.exists() or marker.read_text() != fingerprint):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return work


def make_classifiers(recipe: Recipe, cache_dir: Path | None = None) -> list[Any]:
    """The filter's classifier backends (``bsafe_data.classify.factory``); HTTP and local-model
    backends answer from the response cache in ``cache_dir`` (default: the engine's)."""
    from bsafe_data.classify.factory import make_classifiers as factory
    from bsafe_data.classify.local import LocalModelUnavailable

    try:
        return factory(recipe, cache_dir)
    except (LocalModelUnavailable, ValueError) as exc:
        raise BuildError(str(exc)) from None


def make_generator(recipe: Recipe, cache_dir: Path | None) -> Generator:
    """The generator backend the recipe names."""
    from bsafe_data.generate.factory import GeneratorUnavailable
    from bsafe_data.generate.factory import make_generator as factory

    try:
        return factory(recipe.generator, cache_dir=cache_dir)
    except GeneratorUnavailable as exc:
        raise BuildError(str(exc)) from None


def build(
    recipe: Recipe,
    out_dir: Path,
    *,
    limit: int | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    generator: Generator | None = None,
) -> BuildResult:
    """Run the whole build and write the dataset folder; resumes from finished chunks."""
    from bsafe_data.writer import write_dataset_folder

    timings: Counter[str] = Counter()
    started = time.perf_counter()
    try:
        tokenizers = {ref: load_tokenizer(ref) for ref in recipe.tokenizers.all}
        nlp = load_nlp(recipe.segmentation.spacy_model)
    except Exception as exc:  # TokenizerLoadError, SegmentationError: both carry readable messages
        raise BuildError(str(exc)) from None
    own_generator = generator is None
    generator = generator or make_generator(recipe, cache_dir)
    method = BsafePlusMethod(
        recipe,
        nlp,
        tokenizers,
        generator,
        make_classifiers(recipe, cache_dir),
        multi_source=len(recipe.sources) > 1,
    )
    timings["setup"] += time.perf_counter() - started
    work = prepare_work_dir(out_dir, recipe, limit)
    parts: list[ChunkStats] = []
    resumed = done_rows = kept = rejected = 0
    try:
        items = read_sources(recipe.sources, limit)
        for index, chunk in enumerate(_chunks(items, recipe.output.chunk_rows)):
            done = work / f"chunk-{index:06d}"
            if done.exists():
                parts.append(_load_chunk_stats(done))
                resumed += 1
            else:
                t0 = time.perf_counter()
                out = method.process(chunk)
                timings["process"] += time.perf_counter() - t0
                stats = ChunkStats.from_output(len(chunk), out)
                t0 = time.perf_counter()
                _write_chunk(work, index, out, stats)
                timings["write_chunks"] += time.perf_counter() - t0
                parts.append(stats)
            if progress:  # running totals: merging every chunk's stats each time would be quadratic
                done_rows += parts[-1].source_rows
                kept += sum(parts[-1].kept.values())
                rejected += parts[-1].rejected
                usage = getattr(generator, "usage", {})
                progress({"source_rows": done_rows, "kept": kept, "rejected": rejected, "usage": usage})
    except Exception as exc:
        if exc.__class__.__name__ in {"SourceError", "FatalEndpointError"}:
            raise BuildError(str(exc)) from None
        raise
    finally:
        if own_generator:
            generator.close()
    stats = merge_stats(parts)
    t0 = time.perf_counter()
    usage = dict(getattr(generator, "usage", {}) or {})
    timings.update(method.timings)
    timings_out = {k: round(v, 3) for k, v in sorted(timings.items())}
    counts = write_dataset_folder(
        out_dir, work, recipe, stats, funnel_of(stats), usage=usage, timings=timings_out
    )
    timings_out["write_dataset"] = round(time.perf_counter() - t0, 3)
    timings_out["total"] = round(time.perf_counter() - started, 3)
    return BuildResult(out_dir, funnel_of(stats), counts, stats, timings_out, usage, resumed)
