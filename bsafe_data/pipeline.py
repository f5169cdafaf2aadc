"""A whole build: recipe → method → executor → dataset-wide passes → dataset folder.

``build`` picks the method from the recipe, lets the executor run (or resume) the chunks, runs the
dataset-wide duplicate pass and writes the Hub-layout folder (``writer``). It is the library entry
point behind ``bsafe-data build``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bsafe_data.errors import BuildError, BuildStopped
from bsafe_data.executor.local import ChunkRun, LocalExecutor, Tick, dedupe_chunks, prepare_work_dir
from bsafe_data.executor.output import OutputError, OutputFolder, os_error_message
from bsafe_data.executor.processes import ProcessExecutor, summed_usage
from bsafe_data.executor.ray import RayExecutor
from bsafe_data.generate.base import Generator
from bsafe_data.llm.batch import BatchExported, BatchOptions
from bsafe_data.llm.errors import FatalEndpointError
from bsafe_data.methods.base import Method, Resources
from bsafe_data.recipe import Recipe
from bsafe_data.registry import method_class
from bsafe_data.sources import SourceError, count_source_rows, read_sources, source_identities
from bsafe_data.stages.stats import ChunkStats, funnel_of, merge_stats
from bsafe_data.writer import ChunkFolders, write_dataset_folder

__all__ = ["BuildError", "BuildProgress", "BuildResult", "BuildStopped", "build"]

#: the batch state folder inside the work folder (``bsafe_data.llm.batch``)
BATCH_DIR = "batches"


@dataclass
class BuildProgress:
    """What a running build reports: rows so far, the source's size when it is known, and every
    endpoint's counters (``Engine.snapshot``, summed over workers)."""

    source_rows: int = 0
    rows: int = 0
    kept: int = 0
    rejected: int = 0
    total: int | None = None
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)


ProgressFn = Callable[[BuildProgress], None]


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
    notes: list[str] = field(default_factory=list)

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
    batch_export: Path | None = None,
    batch_import: Path | None = None,
) -> BuildResult:
    """Run the whole build and swap the finished dataset folder in; resumes from finished chunks.

    ``progress`` receives a ``BuildProgress`` as chunks finish and while requests are in flight.
    ``generator`` replaces the recipe's generator backend (the caller closes it). ``force``
    replaces a folder built from another recipe; ``allow_empty`` writes a dataset that kept no row
    instead of stopping. ``batch_export`` writes the calls of every LLM endpoint to that file (Batch
    JSONL) and stops (``BuildStopped``); ``batch_import`` answers calls from an offline engine's
    output file (``bsafe_data.llm.batch``). Raises BuildError (its subclasses: OutputError,
    EndpointDown, BuildStopped).
    """
    if (batch_export or batch_import) and recipe.execution.executor != "local":
        raise BuildError("--batch-export and --batch-import need execution.executor=local")
    folder = OutputFolder(out_dir, recipe.name, force=force)
    folder.check()
    flags = {"export_to": batch_export, "import_from": batch_import}
    with folder.locked():
        return _build(recipe, folder, limit, cache_dir, progress, generator, allow_empty, flags)


def _build(
    recipe: Recipe,
    folder: OutputFolder,
    limit: int | None,
    cache_dir: Path | None,
    progress: ProgressFn | None,
    generator: Generator | None,
    allow_empty: bool,
    batch_flags: dict[str, Path | None],
) -> BuildResult:
    started = time.perf_counter()
    method_cls = method_class(recipe)
    batch = BatchOptions.of(recipe.batch, folder.work / BATCH_DIR, **batch_flags)

    def load(workers: int) -> Method:
        t0 = time.perf_counter()
        resources = Resources.load(recipe.shared_by(workers), cache_dir, generator, batch)
        method = method_cls(recipe, resources)
        method.timings["setup"] += time.perf_counter() - t0
        return method

    def read() -> Any:
        return read_sources(recipe.sources, limit)

    try:
        source_identities(recipe.sources)  # readable, and no source twice: say so before any work
        report = _Report(progress, count_source_rows(recipe.sources, limit)) if progress else None
        work = prepare_work_dir(folder.work, recipe, limit)
        execution = recipe.execution
        if execution.executor == "local":
            run = LocalExecutor(recipe, work).run(read, load, report)
        elif execution.executor == "processes":
            run = ProcessExecutor(recipe, work, execution.workers).run(read, load, report)
        else:
            run = RayExecutor(recipe, work, execution.workers, execution.ray_address).run(read, load, report)
    except BatchExported as exc:
        raise BuildStopped(str(exc)) from None
    except (SourceError, FatalEndpointError) as exc:
        raise BuildError(str(exc)) from None
    except OSError as exc:
        raise OutputError(os_error_message(exc, f"writing chunks to {folder.work}")) from None
    clients = summed_usage(run.usage)
    usage = clients.get("generator", {})
    timings: Counter[str] = Counter()
    for part in run.timings:
        timings.update(part)
    if recipe.filters.enabled:
        t0 = time.perf_counter()
        run = dedupe_chunks(work, run, method_cls, recipe, method_cls.rules_for(recipe).new_dedupe())
        timings["dedupe"] += time.perf_counter() - t0
    return _write(recipe, folder, run, clients, usage, timings, started, allow_empty)


def _write(
    recipe: Recipe,
    folder: OutputFolder,
    run: ChunkRun,
    clients: dict[str, dict[str, Any]],
    usage: dict[str, Any],
    timings: Counter[str],
    started: float,
    allow_empty: bool,
) -> BuildResult:
    """Dataset-wide checks, then the Hub-layout folder written into staging and swapped in."""
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
    return BuildResult(folder.target, funnel, counts, stats, timings_out, usage, run.resumed, run.notes)


class _Report:
    """Turns the workers' ticks into running totals for the caller's progress function."""

    def __init__(self, progress: ProgressFn, total: int | None):
        self.progress = progress
        self.state = BuildProgress(total=total)
        self.by_worker: dict[int, dict[str, dict[str, Any]]] = {}

    def __call__(self, tick: Tick) -> None:
        state = self.state
        for stats in tick.chunks:  # running totals: re-merging every chunk would be quadratic
            kept = sum(stats.kept.values())
            state.source_rows += stats.source_rows
            state.rows += kept + stats.rejected
            state.kept += kept
            state.rejected += stats.rejected
        if tick.endpoints:
            self.by_worker[tick.worker] = tick.endpoints
        state.endpoints = _summed_endpoints(self.by_worker.values())
        self.progress(state)


def _summed_endpoints(snapshots: Any) -> dict[str, dict[str, Any]]:
    """Every worker's endpoint counters added up per role (the longest wait kept)."""
    total: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:
        for role, counters in snapshot.items():
            into = total.setdefault(role, {"url": counters["url"], "wait": None})
            for key, value in counters.items():
                if key == "wait":
                    if value is not None and (into["wait"] is None or value[1] > into["wait"][1]):
                        into["wait"] = value
                elif key == "batch_states":  # words: joined
                    into[key] = ", ".join(filter(None, (into.get(key, ""), value)))
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    into[key] = into.get(key, 0) + value
    return total


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
