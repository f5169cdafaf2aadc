"""A whole build: recipe → method → executor → dataset-wide passes → dataset folder.

``build`` picks the method from the recipe, lets the executor run (or resume) the chunks, runs the
dataset-wide duplicate pass and writes the Hub-layout folder (``writer``). It is the library entry
point behind ``bsafe-data build``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsafe_data import heap
from bsafe_data.errors import BuildError
from bsafe_data.executor.local import LocalExecutor, dedupe_chunks, prepare_work_dir
from bsafe_data.executor.output import OutputError, OutputFolder, os_error_message
from bsafe_data.executor.processes import ProcessExecutor, summed_usage
from bsafe_data.executor.ray import RayExecutor
from bsafe_data.generate.base import Generator
from bsafe_data.llm.errors import FatalEndpointError
from bsafe_data.methods.base import Method, Resources, method_class
from bsafe_data.plots import start_plotter
from bsafe_data.recipe import Recipe
from bsafe_data.sources import SourceError, read_sources
from bsafe_data.stages.stats import ChunkStats, funnel_of, merge_stats

__all__ = ["BuildError", "BuildResult", "build"]

ProgressFn = Callable[[dict[str, Any]], None]


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

    @property
    def incomplete(self) -> int:
        """Rows rejected for a transient reason (a re-run retries them); 0 when complete."""
        return self.stats.transient


def build(
    recipe: Recipe,
    out_dir: Path,
    *,
    limit: int | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    generator: Generator | None = None,
    force: bool = False,
    allow_empty: bool = False,
) -> BuildResult:
    """Run the whole build and swap the finished dataset folder in; resumes from finished chunks.

    ``progress`` receives running totals (``source_rows``, ``kept``, ``rejected``, ``usage``) after
    each chunk. ``generator`` replaces the recipe's generator backend (the caller closes it).
    ``force`` replaces a folder built from another recipe; ``allow_empty`` writes a dataset that
    kept no row instead of stopping. Raises BuildError (its subclasses: OutputError, EndpointDown).
    """
    folder = OutputFolder(out_dir, recipe.name, force=force)
    folder.check()
    holds: list[None] = []  # one per load in this process (``heap.HEAP.enter``), released at the end
    try:
        with folder.locked():
            return _build(recipe, folder, limit, cache_dir, progress, generator, allow_empty, holds)
    finally:
        for _ in holds:
            heap.HEAP.exit()


def _build(
    recipe: Recipe,
    folder: OutputFolder,
    limit: int | None,
    cache_dir: Path | None,
    progress: ProgressFn | None,
    generator: Generator | None,
    allow_empty: bool,
    holds: list[None],
) -> BuildResult:
    from bsafe_data.writer import ChunkFolders, write_dataset_folder

    timings: Counter[str] = Counter()
    started = time.perf_counter()
    method_cls = method_class(recipe)
    loaded: list[tuple[Resources, Method]] = []

    def load(workers: int) -> Method:
        t0 = time.perf_counter()
        resources = Resources.load(recipe.shared_by(workers), cache_dir, generator)
        method = method_cls(recipe, resources)
        loaded.append((resources, method))
        # the set-up's objects live as long as the build: full collections skip them until its
        # folder is written (a full scan right after the last answer cost ~0.3 s, measured).
        # Through the module: a Ray worker gets this function pickled, and the counter holds a lock
        heap.HEAP.enter()
        holds.append(None)
        timings["setup"] += time.perf_counter() - t0
        return method

    totals: Counter[str] = Counter()
    worker_usage: list[dict[str, dict[str, Any]]] = []  # per worker (process, actor): per client
    worker_timings: list[dict[str, float]] = []

    def on_chunk(stats: ChunkStats) -> None:  # running totals: re-merging every chunk would be quadratic
        totals["source_rows"] += stats.source_rows
        totals["rows"] += sum(stats.kept.values()) + stats.rejected
        totals["kept"] += sum(stats.kept.values())
        totals["rejected"] += stats.rejected
        usage = loaded[0][0].generator.usage if loaded else {}
        progress({**totals, "usage": usage})

    start_plotter()  # matplotlib loads in its own process while the chunks run (``plots``)
    try:
        work = prepare_work_dir(folder.work, recipe, limit)
        items = read_sources(recipe.sources, limit)
        on = on_chunk if progress else None
        execution = recipe.execution
        if execution.executor == "local":
            run = LocalExecutor(recipe, work).run(items, load, on)
        else:
            pool: ProcessExecutor | RayExecutor = (
                ProcessExecutor(recipe, work, execution.workers)
                if execution.executor == "processes"
                else RayExecutor(recipe, work, execution.workers, execution.ray_address)
            )
            run = pool.run(items, load, on)
            worker_usage, worker_timings = list(pool.usage.values()), list(pool.timings.values())
    except (SourceError, FatalEndpointError) as exc:
        raise BuildError(str(exc)) from None
    except OSError as exc:
        raise OutputError(os_error_message(exc, f"writing chunks to {folder.work}")) from None
    finally:
        for resources, _ in loaded:
            resources.close()
    for resources, method in loaded:
        worker_usage.append(resources.usage())
        worker_timings.append(dict(method.timings))
    clients = summed_usage(worker_usage)
    usage = clients.get("generator", {})
    for part in worker_timings:
        timings.update(part)
    if recipe.filters.enabled:
        t0 = time.perf_counter()
        run = dedupe_chunks(work, run, method_cls, recipe, method_cls.rules_for(recipe).new_dedupe())
        timings["dedupe"] += time.perf_counter() - t0
    stats = merge_stats(run.stats)
    funnel = funnel_of(stats)
    _check_not_empty(funnel, allow_empty)
    t0 = time.perf_counter()
    timings_out = {k: round(v, 3) for k, v in sorted(timings.items())}
    staging = folder.new_staging()
    try:
        from bsafe_data.audit.report import card_section

        counts = write_dataset_folder(
            staging,
            ChunkFolders(run.chunks),
            recipe,
            stats,
            funnel,
            usage=usage,
            client_usage=clients,
            timings=timings_out,
            audit=card_section(folder.target),  # the audit store is carried over from the target
        )
        folder.write_marker(staging, recipe.sha256())
        folder.commit()
    except OSError as exc:
        folder.discard()
        raise OutputError(os_error_message(exc, f"writing {folder.target}")) from None
    except BaseException:
        folder.discard()
        raise
    if not stats.transient:
        folder.finish()  # chunks with transient failures stay: the next run retries just those
    timings_out["write_dataset"] = round(time.perf_counter() - t0, 3)
    timings_out["total"] = round(time.perf_counter() - started, 3)
    return BuildResult(folder.target, funnel, counts, stats, timings_out, usage, run.resumed)


def _check_not_empty(funnel: dict[str, Any], allow_empty: bool) -> None:
    """0 rows read or 0 rows kept is an error, unless the caller allows an empty dataset."""
    if funnel["source_rows"] == 0:
        raise BuildError("no source rows were read: check `sources` (paths, split, limit)")
    if funnel["kept"] == 0 and not allow_empty:
        reasons = sorted(funnel["rejected_by_reason"].items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{reason} {n}" for reason, n in reasons)
        raise BuildError(
            f"0 of {funnel['rows']} rows kept ({top}); nothing was written. Fix the cause, or pass "
            "--allow-empty to write the empty dataset with its rejected rows"
        )
