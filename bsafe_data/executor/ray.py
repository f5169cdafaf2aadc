"""The Ray executor: chunks run by Ray actors (one per worker, on any node), results through Ray.

The driver reads the sources and hands each actor chunks (at most ``_PER_ACTOR`` in flight each);
an actor loads its resources once (the ``load`` hook, with its 1/N share of every endpoint's limits)
and runs the chunks in its own flow, several in flight, as the local executor does. Finished chunks
come back as Arrow tables through Ray's object store and the driver writes them into its work
folder, so actors need no file system shared with the driver (none is given the output folder's
path), and resume, the dedupe pass and the written dataset are identical to ``local``.
``address="auto"`` joins a running cluster; otherwise a local ``ray.init`` starts one with
``workers`` CPUs. Ray is an optional extra (``pip install 'bsafe-data[ray]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bsafe_data.errors import BuildError
from bsafe_data.executor.flow import Flow
from bsafe_data.executor.local import (
    ChunkRun,
    LoadFn,
    LocalExecutor,
    ProgressFn,
    ReadFn,
    Tick,
    chunk_name,
    chunk_tables,
    write_chunk_tables,
)
from bsafe_data.recipe import Recipe
from bsafe_data.sources import SourceItem
from bsafe_data.stages.stats import ChunkStats

#: chunks in flight per actor (its flow overlaps them)
_PER_ACTOR = 2
_POLL_S = 0.2


class _Worker:
    """A Ray actor's state: one method with its resources and its flow, loaded once."""

    def __init__(self, load: LoadFn, workers: int):
        import os

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.method = load(workers)
        self.flow = Flow(self.method, self.method.resources.engine)

    def add(self, index: int, chunk: Sequence[SourceItem]) -> None:
        self.flow.add(index, chunk)

    def pump(self, timeout: float) -> tuple[list[tuple[int, dict[str, Any], ChunkStats]], dict[str, Any]]:
        """Finished chunks (index, Arrow tables, counters) and the engine's endpoints."""
        finished = [
            (index, chunk_tables(out, self.method.features), out.stats)
            for index, out in self.flow.pump(timeout)
        ]
        return finished, self.method.resources.engine.snapshot()

    def close(self) -> tuple[dict[str, Any], dict[str, float]]:
        """The usage and timings of this actor; its resources closed."""
        usage, timings = self.method.resources.usage(), dict(self.method.timings)
        self.method.resources.close()
        return usage, timings


class RayExecutor:
    """Runs chunks on Ray actors; same chunks, same files as ``LocalExecutor``."""

    def __init__(self, recipe: Recipe, work: Path, workers: int | None = None, address: str | None = None):
        self.plan = LocalExecutor(recipe, work)
        self.work = work
        self.workers = workers
        self.address = address

    def run(self, read: ReadFn, load: LoadFn, progress: ProgressFn | None = None) -> ChunkRun:
        """Process (or resume) every chunk on Ray actors; the run in chunk order."""
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
            return self._run(ray, read, load, progress)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray: Any, read: ReadFn, load: LoadFn, progress: ProgressFn | None) -> ChunkRun:
        count = self.workers or max(1, int(ray.available_resources().get("CPU", 1)))
        actors = [ray.remote(num_cpus=1)(_Worker).remote(load, count) for _ in range(count)]
        run = ChunkRun()
        done: dict[int, tuple[Path, ChunkStats]] = {}
        order: list[int] = []
        flying: list[set[int]] = [set() for _ in actors]

        def poll() -> None:
            busy = [a for a, chunks in enumerate(flying) if chunks]
            answers = ray.get([actors[a].pump.remote(_POLL_S) for a in busy])
            ticks: list[ChunkStats] = []
            endpoints: dict[str, Any] = {}
            for a, (finished, snapshot) in zip(busy, answers, strict=True):
                for index, tables, stats in finished:
                    done[index] = (write_chunk_tables(self.work, index, tables, stats), stats)
                    flying[a].discard(index)
                    ticks.append(stats)
                endpoints.update({f"{role} #{a}": value for role, value in snapshot.items()})
            if progress is not None:
                progress(Tick(ticks, endpoints))

        try:
            for index, chunk, stats in self.plan.chunks(read(), run.notes):
                order.append(index)
                if chunk is None:
                    assert stats is not None
                    run.resumed += 1
                    done[index] = (self.work / chunk_name(index), stats)
                    continue
                while min(len(chunks) for chunks in flying) >= _PER_ACTOR:
                    poll()
                target = min(range(count), key=lambda a: len(flying[a]))
                ray.get(actors[target].add.remote(index, chunk))
                flying[target].add(index)
            while any(flying):
                poll()
        finally:
            for usage, timings in ray.get([actor.close.remote() for actor in actors]):
                run.usage.append(usage)
                run.timings.append(timings)
        for index in order:
            path, stats = done[index]
            run.chunks.append(path)
            run.stats.append(stats)
        return run
