"""One build in a fresh process, with the package of a given source tree (the benchmarks' runner).

``python benchmarks/build_once.py TREE RECIPE OUT CACHE`` imports ``bsafe_data`` from ``TREE`` (this
checkout, or an older commit's for a side-by-side run), builds ``RECIPE`` into ``OUT`` with the
response cache ``CACHE``, and prints one JSON line: the monotonic clock at process start and at the
end of the build, the funnel, the timings and the sha256 of every parquet file written.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()

import hashlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    tree, recipe_path, out, cache = sys.argv[1:5]
    sys.path.insert(0, tree)
    from bsafe_data.pipeline import build

    try:
        from bsafe_data.registry import load_recipe
    except ImportError:  # a tree from before the registry
        from bsafe_data.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    result = build(recipe, Path(out), cache_dir=Path(cache), allow_empty=True)
    ended = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    hashes = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(out).rglob("*"))
        if p.suffix in (".parquet", ".png")
    }
    print(
        json.dumps(
            {
                "started": STARTED,
                "ended": ended,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "funnel": result.funnel,
                "timings": result.timings,
                "hashes": hashes,
                "package": str(Path(sys.modules["bsafe_data"].__file__).parent),
            }
        )
    )


if __name__ == "__main__":
    main()
