"""The processes executor: ``workers`` processes, each running the local executor on its rank.

Rank/world-size sharding (as datatrove's executors): worker ``r`` of ``N`` reads the source stream
itself and processes chunks ``i`` with ``i % N == r``, several in flight in its own flow, with its
1/N share of every endpoint's limits (``Recipe.shared_by``: the workers together stay within them).
Workers write finished chunks atomically into the same work folder the local executor uses, so
resume, the dedupe pass and the written dataset are identical to ``local``. Workers are forked
before anything is loaded (the method registry and the recipe are inherited); they report progress
and their result over a queue.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import traceback
from pathlib import Path
from typing import Any

from bsafe_data.errors import BuildError
from bsafe_data.executor.local import ChunkRun, LoadFn, LocalExecutor, ProgressFn, ReadFn
from bsafe_data.llm.breaker import QualityStop
from bsafe_data.llm.errors import FatalEndpointError
from bsafe_data.recipe import Recipe
from bsafe_data.sources import SourceError


def summed_usage(per_worker: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The workers' usage counters (``Resources.usage``: per client) added up per client
    (``cost_usd`` rounded like the backend's)."""
    total: dict[str, dict[str, Any]] = {}
    for usage in per_worker:
        for client, counters in usage.items():
            into = total.setdefault(client, {})
            for key, value in counters.items():
                into[key] = into.get(key, 0) + value
    for counters in total.values():
        if "cost_usd" in counters:
            counters["cost_usd"] = round(counters["cost_usd"], 6)
    return total


def _work(rank: int, executor: LocalExecutor, read: ReadFn, load: LoadFn, events: Any) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; no fork warnings
    try:
        run = executor.run(read, load, progress=lambda tick: events.put(("tick", rank, tick)))
        events.put(("done", rank, run))
    except (BuildError, FatalEndpointError, SourceError) as exc:
        events.put(("failed", rank, exc if isinstance(exc, QualityStop) else str(exc)))
    except BaseException:  # a bug: its traceback, for the report
        events.put(("crashed", rank, traceback.format_exc()))


class ProcessExecutor:
    """Runs the chunks in ``workers`` processes; same chunks, same files as ``LocalExecutor``."""

    def __init__(self, recipe: Recipe, work: Path, workers: int | None = None):
        self.recipe = recipe
        self.work = work
        self.workers = max(1, workers or os.cpu_count() or 1)

    def run(self, read: ReadFn, load: LoadFn, progress: ProgressFn | None = None) -> ChunkRun:
        """Process (or resume) every chunk in the worker processes; the run in chunk order."""
        context = multiprocessing.get_context("fork")
        events = context.Queue()
        procs = []
        for rank in range(self.workers):
            executor = LocalExecutor(self.recipe, self.work, rank=rank, world_size=self.workers)
            proc = context.Process(target=_work, args=(rank, executor, read, load, events), daemon=True)
            proc.start()
            procs.append(proc)
        runs: dict[int, ChunkRun] = {}
        try:
            while len(runs) < self.workers:
                try:
                    kind, rank, payload = events.get(timeout=1.0)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in runs]
                    if dead:
                        raise BuildError(f"worker {dead[0]} stopped without a result (killed?)") from None
                    continue
                if kind == "tick":
                    if progress is not None:
                        progress(payload)
                elif kind == "done":
                    runs[rank] = payload
                elif kind == "failed":
                    raise payload if isinstance(payload, BuildError) else BuildError(payload)
                else:
                    raise RuntimeError(f"worker {rank} crashed:\n{payload}")
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                proc.join()
        return _in_chunk_order(list(runs.values()))


def _in_chunk_order(runs: list[ChunkRun]) -> ChunkRun:
    """The workers' runs as one, chunks in chunk order (by their folder names)."""
    out = ChunkRun()
    pairs = sorted(
        ((path, stats) for run in runs for path, stats in zip(run.chunks, run.stats, strict=True)),
        key=lambda pair: pair[0].name,
    )
    out.chunks = [path for path, _ in pairs]
    out.stats = [stats for _, stats in pairs]
    for run in runs:
        out.resumed += run.resumed
        out.notes += run.notes
        out.usage += run.usage
        out.timings += run.timings
    return out
