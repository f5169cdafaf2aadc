"""Build throughput and peak memory with the builtin generator on a synthetic corpus.

Usage: python benchmarks/build_throughput.py [--sizes 10000 100000] [--executor local processes]
       [--variants 1]  (rows per source answer; the flagship recipe uses 5; "rows" below are source rows)

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
from synthetic_corpus import write_corpus  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {here!r})
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
print(json.dumps({{"rows": n, "executor": executor, "seconds": elapsed, "rows_per_s": n / elapsed,
                  "peak_rss_mb": peak_mb, "kept": result.funnel["kept"], "timings": result.timings}}))
"""


def run_size(n: int, executor: str, corpus: Path, variants: int = 1) -> dict:
    """Build the n-row ``corpus`` in a child process with ``executor``; returns its measurements."""
    code = _CHILD.format(here=str(HERE), recipe=str(REPO / "recipes" / "bsafe_plus.yaml"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as work:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(n), work, executor, str(corpus), str(variants)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print rows/s and peak RSS per size, and the memory ratio between the largest and smallest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--executor", nargs="+", default=["local"], choices=["local", "processes"])
    parser.add_argument("--variants", type=int, default=1, help="sampling.variants_per_answer")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as corpora:  # one corpus per size, at one path: same rows per executor
        for n in args.sizes:
            corpus = write_corpus(Path(corpora) / f"corpus-{n}.jsonl", n)
            for ex in args.executor:
                runs[(n, ex)] = run_size(n, ex, corpus, args.variants)
    print(f"{'rows':>8} {'executor':>10} {'seconds':>8} {'rows/s':>8} {'peak RSS MB':>12} {'kept':>8}")
    for (n, ex), r in runs.items():
        rate, peak = r["rows_per_s"], r["peak_rss_mb"]
        print(f"{n:>8} {ex:>10} {r['seconds']:>8.1f} {rate:>8.0f} {peak:>12.0f} {r['kept']:>8}")
    if "local" in args.executor and "processes" in args.executor:
        for n in args.sizes:
            speedup = runs[(n, "processes")]["rows_per_s"] / runs[(n, "local")]["rows_per_s"]
            print(f"processes / local at {n} rows: {speedup:.2f}x")
    results = [runs[(n, args.executor[0])] for n in args.sizes]
    if len(results) > 1:
        ratio = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
        print(f"peak RSS ratio {results[-1]['rows']}/{results[0]['rows']} rows: {ratio:.2f} (1.0 = flat)")
    print("timings (s) of the largest run:", json.dumps(results[-1]["timings"]))


if __name__ == "__main__":
    main()
