"""Refilter throughput on a large dataset folder, and proof that it makes no model calls.

Usage: python benchmarks/refilter_throughput.py [--rows 1000000] [--set filters.classifiers.0.threshold=0.6]
       [--work /tmp/bsafe-bench-refilter] [--repeats 3] [--profile]

A real seed folder is built once from ``recipes/bsafe_plus.yaml`` (bundled corpus, builtin
generator and classifier: offline), then replicated into a folder of ``--rows`` rows: every source
row is copied under new source ids and indexes (``ec-0001~r7``), so rows, chunks and splits are
what a build of a corpus that large would have. The large folder is written with the library's own
chunk and folder writers (``Method.chunk_from_rows``, ``write_chunk``, ``write_dataset_folder``)
and cached under ``--work``; each of ``--repeats`` runs copies it (flushed to disk) and times
``refilter`` on the copy in a fresh process, as ``bsafe-data refilter`` runs (a second refilter in
the same process reuses memory the first one mapped, which hides a real cost). Model calls are
counted in that process by wrapping classifier and generator construction, their
scoring/generation entry points and HTTP transports: refilter must make none.
Everything printed is measured in this run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bsafe_data.executor.local import write_chunk  # noqa: E402
from bsafe_data.executor.output import OutputFolder  # noqa: E402
from bsafe_data.pipeline import build  # noqa: E402
from bsafe_data.refilter import read_rows, refilter  # noqa: E402
from bsafe_data.registry import load_recipe, method_class  # noqa: E402
from bsafe_data.stages.sample import split_of  # noqa: E402
from bsafe_data.stages.stats import funnel_of, merge_stats  # noqa: E402
from bsafe_data.writer import ChunkFolders, write_dataset_folder  # noqa: E402

RECIPE = REPO / "recipes" / "bsafe_plus.yaml"
#: the issue's must-show: a 1M-row folder refiltered in at most 10 s
TARGET_ROWS_PER_S = 100_000


def seed_folder(work: Path) -> Path:
    """A real (small) build of the bundled recipe, built once."""
    out = work / "seed"
    if not (out / "manifest.json").is_file():
        build(load_recipe(RECIPE), out, limit=2000, cache_dir=work / "cache", force=True)
    return out


def _renamed(row: dict[str, Any], copy: int, index_shift: int) -> dict[str, Any]:
    """Row ``row`` of source copy ``copy``: new source id and index, row id (keyed by the source
    position) with the same suffix."""
    src = row["source"]
    new_id = f"{src['id']}~r{copy}" if copy else src["id"]
    index = src["index"] + index_shift
    out = {**row, "source": {**src, "id": new_id, "index": index}}
    out["id"] = str(index) + row["id"][len(str(src["index"])) :]
    return out  # nested values are shared with the seed row: nothing below changes them


def _identity(source: dict[str, Any]) -> tuple[str, str, int]:
    return source["dataset"], source["revision"], source["index"]


def large_folder(work: Path, rows: int) -> Path:
    """A ``rows``-row dataset folder replicated from the seed build (cached under ``work``)."""
    out = work / f"src-{rows}"
    if (out / "manifest.json").is_file():
        return out
    seed = seed_folder(work)
    recipe = load_recipe(seed / "recipe.yaml")
    method = method_class(recipe)
    manifest = json.loads((seed / "manifest.json").read_text())
    by_source: dict[int, list[dict[str, Any]]] = {}
    for row in read_rows(seed):
        row.pop("_split")
        by_source.setdefault(row["source"]["index"], []).append(row)
    per_copy = max(by_source) + 1
    chunk_rows = recipe.output.chunk_rows
    folder = OutputFolder(out, recipe.name, force=True)
    t0 = time.perf_counter()
    with folder.locked():
        shutil.rmtree(folder.work, ignore_errors=True)
        folder.work.mkdir(parents=True)
        paths, parts, total, position = [], [], 0, 0
        while total < rows:  # one build chunk (chunk_rows source rows) at a time: bounded memory
            chunk: list[dict[str, Any]] = []
            end = position + chunk_rows
            while position < end and total + len(chunk) < rows:
                copy, index = divmod(position, per_copy)
                chunk.extend(_renamed(r, copy, copy * per_copy) for r in by_source.get(index, []))
                position += 1
            chunk.sort(key=lambda r: method.order_key(r, r["source"]["index"]))
            splits = {
                r["id"]: split_of(recipe.seed, recipe.split.test_fraction, *_identity(r["source"]))
                for r in chunk
            }
            sources = len({r["source"]["index"] for r in chunk})
            built = method.chunk_from_rows(chunk, splits)
            built.stats.source_rows = sources
            paths.append(write_chunk(folder.work, len(paths), built, method.features))
            parts.append(built.stats)
            total += len(chunk)
        stats = merge_stats(parts)
        staging = folder.new_staging()
        write_dataset_folder(
            staging, ChunkFolders(paths), recipe, stats, funnel_of(stats),
            usage=manifest.get("usage", {}), timings={"synthesised": round(time.perf_counter() - t0, 3)},
        )  # fmt: skip
        folder.write_marker(staging, recipe.sha256())
        folder.commit()
        folder.finish()
    print(f"synthesised {total} rows ({position} source rows) in {time.perf_counter() - t0:.1f} s: {out}")
    return out


class CallCounter:
    """Counts model and endpoint activity: classifiers/generators built, batches scored or
    generated, HTTP transports opened. Installed by wrapping the library's entry points."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def install(self) -> None:
        """Wrap the constructors and batch entry points of every backend."""
        from bsafe_data.classify import base as classify_base
        from bsafe_data.classify import factory as classify_factory
        from bsafe_data.generate import base as generate_base
        from bsafe_data.generate import factory as generate_factory
        from bsafe_data.llm import transport
        from bsafe_data.stages import classify as classify_stage
        from bsafe_data.stages import generate as generate_stage

        self._wrap(classify_base.Classifier, "__init__", "classifiers built")
        self._wrap(classify_base, "score_items", "classifier batches")
        self._wrap(classify_stage, "classify", "classify stage calls")
        self._wrap(classify_factory, "make_classifiers", "classifier factory calls")
        self._wrap(generate_factory, "make_generator", "generator factory calls")
        self._wrap(generate_stage, "send", "generator batches")
        self._wrap(generate_base.Generator, "submit", "generator submits")
        self._wrap(transport.Transport, "__init__", "HTTP transports opened")

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        counts = self.counts

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[label] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    @property
    def total(self) -> int:
        """Every counted call."""
        return sum(self.counts.values())


def run_once(run: Path, overrides: list[str], profile: Path | None) -> None:
    """The child process: refilter ``run`` once, print one JSON line (seconds, calls, memory)."""
    calls = CallCounter()
    calls.install()
    profiler = cProfile.Profile() if profile else None
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    result = refilter(run, overrides)
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "seconds": seconds, "calls": dict(calls.counts),
        "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
        "peak_rss_mb": after.ru_maxrss / 1024, "before": result.before["kept"], "after": result.after["kept"],
        "newly_rejected": result.newly_rejected, "newly_kept": result.newly_kept,
    }))  # fmt: skip


def main() -> None:
    """Time ``refilter`` on copies of the large folder, each in a fresh process (what a user's
    ``bsafe-data refilter`` gets: no memory left mapped by an earlier run); print seconds, rows/s
    and model calls."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--set", dest="overrides", action="append", default=None,
                        help="refilter override (default: filters.classifiers.0.threshold=0.6)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/bsafe-bench-refilter"))
    parser.add_argument("--profile", action="store_true", help="print the costliest functions")
    parser.add_argument("--repeats", type=int, default=3, help="timed refilters (the median is reported)")
    parser.add_argument("--keep", action="store_true", help="keep the refiltered copy (WORK/run)")
    parser.add_argument("--run-one", type=Path, help=argparse.SUPPRESS)  # the child: refilter this folder
    args = parser.parse_args()
    overrides = args.overrides or ["filters.classifiers.0.threshold=0.6"]
    profile = args.work / "refilter.prof" if args.profile else None
    if args.run_one:
        return run_once(args.run_one, overrides, profile)
    args.work.mkdir(parents=True, exist_ok=True)
    source = large_folder(args.work, args.rows)
    run = args.work / "run"
    child = [sys.executable, __file__, "--work", str(args.work), "--run-one", str(run)]
    child += [f"--set={o}" for o in overrides] + (["--profile"] if args.profile else [])
    runs = []
    for _ in range(args.repeats):  # each on a fresh copy, written back to disk before the child starts
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(source, run)
        os.sync()
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(run.glob("*/*.parquet")))
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"refilter failed:\n{done.stderr}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    times = [r["seconds"] for r in runs]
    elapsed = statistics.median(times)
    last = runs[-1]
    calls: Counter[str] = Counter()
    for r in runs:
        calls.update(r["calls"])
    total_calls = sum(calls.values())
    print(f"refilter {' '.join(overrides)}; {args.repeats} runs, each in a fresh process: "
          f"{', '.join(f'{t:.2f}' for t in times)} s")  # fmt: skip
    print("  cpu s (user/sys): " + ", ".join(f"{r['user']:.1f}/{r['sys']:.1f}" for r in runs))
    print(f"{'rows':>9} {'median s':>8} {'rows/s':>9} {'model calls':>12} {'peak RSS MB':>12}")
    peak = max(r["peak_rss_mb"] for r in runs)
    print(f"{rows:>9} {elapsed:>8.2f} {rows / elapsed:>9.0f} {total_calls:>12} {peak:>12.0f}")
    print(f"kept {last['before']} -> {last['after']}; newly rejected {last['newly_rejected']}, "
          f"newly kept {last['newly_kept']}; calls by kind: {dict(calls) or 'none'}")  # fmt: skip
    verdict = "met" if rows / elapsed >= TARGET_ROWS_PER_S else "missed"
    print(f"target {TARGET_ROWS_PER_S} rows/s (1M rows in 10 s): {verdict}")
    if profile:
        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(25)
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(15)
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    if total_calls:
        raise SystemExit(f"refilter made {total_calls} model/endpoint calls: it must make none")


if __name__ == "__main__":
    main()
