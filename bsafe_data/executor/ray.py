"""The Ray executor: the local executor's chunks, run by Ray actors (one per worker, on any node).

Each actor loads its resources once (the ``load`` hook) and processes chunks the driver hands out
in order (at most two per actor in flight, so driver memory stays bounded). Actors write finished
chunks into the same work folder the local executor uses, so resume, the dedupe pass and the
written dataset are identical to ``local``. On a cluster the work folder must be on a file system
every node sees; ``address="auto"`` joins a running cluster, otherwise a local ``ray.init`` starts
one with ``workers`` CPUs. Ray is an optional extra (``pip install 'bsafe-data[ray]'``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bsafe_data.errors import BuildError
from bsafe_data.executor.local import ChunkRun, LoadFn, LocalExecutor, ProgressFn, chunk_name, run_chunk
from bsafe_data.recipe import Recipe
from bsafe_data.sources import SourceItem
from bsafe_data.stages.stats import ChunkStats


class _Worker:
    """A Ray actor's state: one method with its resources, loaded once."""

    def __init__(self, load: LoadFn, workers: int):
        import os

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.method = load(workers)

    def process(self, work: str, index: int, chunk: list[SourceItem]) -> tuple[ChunkStats, dict, dict]:
        stats = run_chunk(self.method, Path(work), index, chunk)
        return stats, self.method.resources.usage(), dict(self.method.timings)


class RayExecutor:
    """Runs chunks on Ray actors; same chunks, same files as ``LocalExecutor``."""

    def __init__(self, recipe: Recipe, work: Path, workers: int | None = None, address: str | None = None):
        self.plan = LocalExecutor(recipe, work)
        self.work = work
        self.workers = workers
        self.address = address
        #: per actor: its clients' usage and stage timings (summed by the caller)
        self.usage: dict[int, dict[str, Any]] = {}
        self.timings: dict[int, dict[str, float]] = {}

    def run(
        self,
        items: Iterable[SourceItem],
        load: LoadFn,
        progress: ProgressFn | None = None,
    ) -> ChunkRun:
        """Process (or resume) every chunk of ``items`` on Ray actors, in chunk order."""
        try:
            import ray
        except ImportError:
            raise BuildError("execution.executor 'ray' needs Ray: pip install 'bsafe-data[ray]'") from None
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(
                address=self.address,
                num_cpus=None if self.address else self.workers,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        try:
            return self._run(ray, items, load, progress)
        finally:
            if started_here:
                ray.shutdown()

    def _run(
        self, ray: Any, items: Iterable[SourceItem], load: LoadFn, progress: ProgressFn | None
    ) -> ChunkRun:
        count = self.workers or max(1, int(ray.available_resources().get("CPU", 1)))
        actors = [ray.remote(num_cpus=1)(_Worker).remote(load, count) for _ in range(count)]
        run = ChunkRun([], [], 0)
        pending: deque[tuple[int, Any]] = deque()
        turn = 0

        def finish(index: int, result: Any) -> None:
            if isinstance(result, ChunkStats):
                stats = result
            else:
                stats, usage, timings = ray.get(result[1])
                self.usage[result[0]], self.timings[result[0]] = usage, timings
            run.finished(self.work / chunk_name(index), stats, progress)

        for index, chunk, stats in self.plan.chunks(items):
            if chunk is None:
                run.resumed += 1
                pending.append((index, stats))
            else:
                slot = turn % count
                turn += 1
                pending.append((index, (slot, actors[slot].process.remote(str(self.work), index, chunk))))
            while len(pending) > 2 * count:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
        return run
