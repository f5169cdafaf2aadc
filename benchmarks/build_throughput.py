"""Build throughput and peak memory with the builtin generator on a synthetic corpus.

Usage: python benchmarks/build_throughput.py [--sizes 10000 100000]

Each size runs in a fresh process (so peak RSS is that build's own) through the real pipeline:
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {here!r})
from synthetic_corpus import write_corpus
from bsafe_data.pipeline import build
from bsafe_data.recipe import load_recipe
n, work = int(sys.argv[1]), Path(sys.argv[2])
corpus = write_corpus(work / "corpus.jsonl", n)
overrides = ["sources=[{{path: " + str(corpus) + "}}]", "sampling.variants_per_answer=1"]
recipe = load_recipe({recipe!r}, overrides)
start = time.perf_counter()
result = build(recipe, work / "out")
elapsed = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"rows": n, "seconds": elapsed, "rows_per_s": n / elapsed, "peak_rss_mb": peak_mb,
                  "kept": result.funnel["kept"], "timings": result.timings}}))
"""


def run_size(n: int) -> dict:
    """Build n synthetic rows in a child process; returns its measurements."""
    code = _CHILD.format(here=str(HERE), recipe=str(REPO / "recipes" / "bsafe_plus.yaml"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as work:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(n), work], capture_output=True, text=True, env=env
        )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print rows/s and peak RSS per size, and the memory ratio between the largest and smallest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    results = [run_size(n) for n in args.sizes]
    print(f"{'rows':>8} {'seconds':>8} {'rows/s':>8} {'peak RSS MB':>12} {'kept':>8}")
    for r in results:
        rate, peak = r["rows_per_s"], r["peak_rss_mb"]
        print(f"{r['rows']:>8} {r['seconds']:>8.1f} {rate:>8.0f} {peak:>12.0f} {r['kept']:>8}")
    if len(results) > 1:
        ratio = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
        print(f"peak RSS ratio {results[-1]['rows']}/{results[0]['rows']} rows: {ratio:.2f} (1.0 = flat)")
    print("timings (s) of the largest run:", json.dumps(results[-1]["timings"]))


if __name__ == "__main__":
    main()
