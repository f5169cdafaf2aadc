"""The processes executor: the local executor's chunks, run by a pool of worker processes.

The parent reads the sources and hands out chunks (at most two per worker in flight, so memory
stays bounded); each worker loads its own resources once (the ``load`` hook: spaCy, tokenizers,
generator, classifiers) and writes finished chunks atomically into the same work folder the local
executor uses, so resume, the dedupe pass and the written dataset are identical to ``local``.
Workers are forked: the method registry and the recipe are inherited, nothing is loaded before.
The endpoints' limits (max-concurrency slots, RPM/TPM budgets) are made in shared memory before
the fork (``llm.shared``) and every worker's transports draw on them: together the workers stay
within the recipe's limits, and a worker with requests uses what an idle one leaves.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bsafe_data.executor.local import ChunkRun, LoadFn, LocalExecutor, ProgressFn, chunk_name, run_chunk
from bsafe_data.llm.shared import SharedEndpoint, for_recipe, install
from bsafe_data.recipe import Recipe
from bsafe_data.sources import SourceItem
from bsafe_data.stages.stats import ChunkStats

_worker: dict[str, Any] = {}  # this worker process's method, built once by ``_start``


def _start(load: LoadFn, limits: dict[str, SharedEndpoint]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; no fork warnings
    install(limits)  # the endpoints' slots and RPM/TPM budgets, shared with the other workers
    _worker["load"] = load


def _process(work: Path, index: int, chunk: list[SourceItem]) -> tuple[ChunkStats, dict[str, Any], dict]:
    method = _worker.get("method")
    if method is None:  # the whole limits: the shared ones keep the workers within them together
        method = _worker["method"] = _worker["load"](1)
    stats = run_chunk(method, work, index, chunk)
    return stats, method.resources.usage(), {"pid": os.getpid(), **method.timings}


def summed_usage(per_worker: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
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


class ProcessExecutor:
    """Runs chunks in ``workers`` processes; same chunks, same files as ``LocalExecutor``."""

    def __init__(self, recipe: Recipe, work: Path, workers: int | None = None):
        self.plan = LocalExecutor(recipe, work)
        self.work = work
        self.workers = max(1, workers or os.cpu_count() or 1)
        #: per worker process: its clients' usage and stage timings (summed by the caller)
        self.usage: dict[int, dict[str, Any]] = {}
        self.timings: dict[int, dict[str, float]] = {}

    def run(
        self,
        items: Iterable[SourceItem],
        load: LoadFn,
        progress: ProgressFn | None = None,
    ) -> ChunkRun:
        """Process (or resume) every chunk of ``items`` in the worker pool, in chunk order."""
        run = ChunkRun([], [], 0)
        pending: deque[tuple[int, Future | ChunkStats]] = deque()
        context = multiprocessing.get_context("fork")

        def finish(index: int, result: Future | ChunkStats) -> None:
            if isinstance(result, ChunkStats):
                stats = result
            else:
                stats, usage, timings = result.result()
                pid = timings.pop("pid")
                self.usage[pid], self.timings[pid] = usage, timings
            run.finished(self.work / chunk_name(index), stats, progress)

        limits = for_recipe(self.plan.recipe, context)  # before the fork: the workers inherit them
        pool = ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_start, initargs=(load, limits)
        )
        with pool:
            for index, chunk, stats in self.plan.chunks(items):
                if chunk is None:
                    run.resumed += 1
                    pending.append((index, stats))
                else:
                    pending.append((index, pool.submit(_process, self.work, index, chunk)))
                while len(pending) > 2 * self.workers or (pending and _done(pending[0][1])):
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
        return run


def _done(result: Future | ChunkStats) -> bool:
    return isinstance(result, ChunkStats) or result.done()
