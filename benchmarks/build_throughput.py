"""Build throughput and peak memory with the builtin generator on a synthetic corpus.

Usage: python benchmarks/build_throughput.py [--sizes 10000 100000] [--executor local processes]
       [--variants 1]  (rows per source answer; the flagship recipe uses 5; "rows" below are source rows)
       [--corpus closed|unique]  (``unique``: every row carries tokens of its own, as real chat data)
       [--baseline TREE]  (also build every size with the package of TREE, e.g. a ``git worktree`` of
       an older commit: peak RSS of both, and whether their parquet files are the same bytes)

Each (size, executor) runs in a fresh process (so peak RSS is that build's own; for ``processes``
the largest worker's) through the real pipeline:
reading, spaCy segmentation, the builtin generator, X for both bundled tokenizers, the builtin
classifier, chunk writes and the final Hub-layout folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_corpus import CORPORA, write_corpus  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

_CHILD = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[6], {here!r}]
from bsafe_data.pipeline import build
from bsafe_data.registry import load_recipe
n, work, executor, corpus = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
overrides = ["sources=[{{path: " + str(corpus) + "}}]", "sampling.variants_per_answer=" + sys.argv[5],
             "execution.executor=" + executor]
recipe = load_recipe({recipe!r}, overrides)
start = time.perf_counter()
result = build(recipe, work / "out")
elapsed = time.perf_counter() - start
who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)  # processes: the largest worker
peak_mb = max(resource.getrusage(w).ru_maxrss for w in who) / 1024
digest = hashlib.sha256()
for path in sorted((work / "out").glob("*/*.parquet")):
    digest.update(path.relative_to(work / "out").as_posix().encode() + path.read_bytes())
print(json.dumps({{"rows": n, "executor": executor, "seconds": elapsed, "rows_per_s": n / elapsed,
                  "peak_rss_mb": peak_mb, "kept": result.funnel["kept"], "timings": result.timings,
                  "parquet_sha256": digest.hexdigest(), "package": sys.modules["bsafe_data"].__file__}}))
"""


def run_size(n: int, executor: str, corpus: Path, variants: int = 1, tree: Path = REPO) -> dict:
    """Build the n-row ``corpus`` in a child process with ``executor`` and the package of ``tree``;
    returns its measurements (and the sha256 of its parquet files, names and bytes)."""
    code = _CHILD.format(here=str(HERE), recipe=str(REPO / "recipes" / "bsafe_plus.yaml"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as work:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(n), work, executor, str(corpus), str(variants), str(tree)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def corpus_path(corpus: str, n: int) -> Path:
    """The ``corpus`` of ``n`` rows at a fixed path (written once): every run builds the same rows."""
    folder = Path(tempfile.gettempdir()) / "bsafe-bench-corpora"
    folder.mkdir(exist_ok=True)
    path = folder / f"{corpus}-{n}.jsonl"
    if not path.exists():
        write_corpus(path.with_suffix(".tmp"), n, corpus=corpus).rename(path)
    return path


def main() -> None:
    """Print rows/s and peak RSS per size, the memory ratio between the largest and smallest, and
    with ``--baseline`` the same for the baseline tree and whether both wrote the same parquet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--executor", nargs="+", default=["local"], choices=["local", "processes"])
    parser.add_argument("--variants", type=int, default=1, help="sampling.variants_per_answer")
    parser.add_argument("--corpus", default="closed", choices=CORPORA)
    parser.add_argument("--baseline", type=Path, help="a source tree to build every size with as well")
    args = parser.parse_args()
    trees = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    runs = {}
    for n in args.sizes:
        corpus = corpus_path(args.corpus, n)
        for tree, path in trees.items():
            for ex in args.executor:
                runs[(n, ex, tree)] = run_size(n, ex, corpus, args.variants, path)
    print(f"{args.corpus} corpus, {args.variants} row(s) per answer")
    header = ("rows", 8), ("executor", 10), ("tree", 9), ("seconds", 8), ("rows/s", 8), ("peak RSS MB", 12)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'kept':>8} parquet sha256")
    for (n, ex, tree), r in runs.items():
        rate, peak, kept, digest = r["rows_per_s"], r["peak_rss_mb"], r["kept"], r["parquet_sha256"][:16]
        print(f"{n:>8} {ex:>10} {tree:>9} {r['seconds']:>8.1f} {rate:>8.0f} {peak:>12.0f} {kept:>8} {digest}")
    if "local" in args.executor and "processes" in args.executor:
        for n in args.sizes:
            speedup = runs[(n, "processes", "this")]["rows_per_s"] / runs[(n, "local", "this")]["rows_per_s"]
            print(f"processes / local at {n} rows: {speedup:.2f}x")
    for tree in trees:
        results = [runs[(n, args.executor[0], tree)] for n in args.sizes]
        if len(results) > 1:
            ratio = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
            sizes = f"{results[-1]['rows']}/{results[0]['rows']} rows"
            print(f"{tree}: peak RSS ratio {sizes}: {ratio:.2f} (1.0 = flat)")
    hashes = {key: r["parquet_sha256"] for key, r in runs.items()}
    for (n, ex, tree), digest in hashes.items():
        if tree != "this":
            same = "the same" if digest == hashes[(n, ex, "this")] else "DIFFERENT"
            print(f"parquet at {n} rows ({ex}), this tree vs {tree}: {same} bytes")
    largest = runs[(args.sizes[-1], args.executor[0], "this")]
    print("timings (s) of the largest run:", json.dumps(largest["timings"]))


if __name__ == "__main__":
    main()
