"""Statistics of a built folder: the funnel per rule, score distributions, histogram plots.

``bsafe-data stats DIR`` prints what the card's funnel shows (rows each rule removed: as first
reason, and every row it failed) and a table per classifier and target (rows scored, errors, mean,
share at or above the threshold); with ``--plots OUT`` it also saves one score histogram per
classifier as ``OUT/scores_<name>.png``. It never changes the dataset folder (the build and
``refilter`` write the same histograms into ``plots/`` and embed them in the card, so ``verify``
still passes after ``stats``). Reading only: no classifier call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bsafe_data.classify.base import ERROR_LABEL
from bsafe_data.recipe import ALL_TARGETS, Recipe
from bsafe_data.registry import load_recipe

SCORE_PLOT_PREFIX = "plots/scores_"


@dataclass
class ScoreSummary:
    """Scores of one classifier on one target over every row (kept and rejected)."""

    classifier: str
    target: str
    scores: np.ndarray  # float64, in row order (an array: a million rows hold millions of scores)
    errors: int
    threshold: float | None

    @property
    def flagged(self) -> int:
        """Rows at or above the threshold (``is_unsafe``: compared as float32)."""
        if self.threshold is None or not len(self.scores):
            return 0
        scores = self.scores.astype(np.float32)
        return int(np.count_nonzero(scores >= np.float32(self.threshold)))


#: per (classifier, target): scores that are not errors, and the error count
EntryScores = tuple[tuple[str, str], np.ndarray, int]


def entry_scores(scores: pa.Array | pa.ChunkedArray) -> Iterator[EntryScores]:
    """Per (classifier, target) of a ``scores`` column's entries, in order of first appearance:
    its scores that are not errors (in entry order) and its error count. Internal entries
    (``bsafe:`` markers) are left out. Arrow and numpy only: a build's writer calls it, and the
    build never imports polars."""
    array = scores.combine_chunks() if isinstance(scores, pa.ChunkedArray) else scores
    flat = pc.list_flatten(array)
    if not len(flat):
        return
    names = pc.dictionary_encode(flat.field("classifier"), null_encoding="encode")
    targets = pc.dictionary_encode(flat.field("target"), null_encoding="encode")
    width = len(targets.dictionary)
    pair = names.indices.to_numpy().astype(np.int64) * width + targets.indices.to_numpy()
    codes, first = np.unique(pair, return_index=True)
    ok = pc.fill_null(pc.not_equal(flat.field("label"), ERROR_LABEL), True).to_numpy(zero_copy_only=False)
    values = flat.field("score").cast(pa.float64()).to_numpy(zero_copy_only=False)
    name_of, target_of = names.dictionary.to_pylist(), targets.dictionary.to_pylist()
    for code in codes[np.argsort(first, kind="stable")].tolist():
        name, target = str(name_of[code // width]), str(target_of[code % width])
        if name.startswith("bsafe:"):
            continue
        mine = pair == code
        yield (name, target), values[mine & ok], int(np.count_nonzero(mine & ~ok))


def _shard_scores(folder: Path) -> Iterator[EntryScores]:
    """``entry_scores`` per shard (``data/`` then ``rejected/``, in name order). One shard at a
    time: memory holds the scores, not every entry's strings."""
    for sub in ("data", "rejected"):
        for path in sorted((folder / sub).glob("*.parquet")):
            yield from entry_scores(pq.read_table(path, columns=["scores"]).column("scores"))


def score_summaries(folder: str | Path, recipe: Recipe | None = None) -> list[ScoreSummary]:
    """One summary per (classifier, target) recorded in the folder, in recipe order."""
    folder = Path(folder)
    return summarised(_shard_scores(folder), recipe or load_recipe(folder / "recipe.yaml"))


def summarised(parts: Iterable[EntryScores], recipe: Recipe) -> list[ScoreSummary]:
    """One summary per (classifier, target) of ``parts`` (``entry_scores`` of one or more row
    sets, added up), in recipe order."""
    thresholds = {c.name: c.threshold for c in recipe.filters.classifiers}
    collected: dict[tuple[str, str], tuple[list[np.ndarray], int]] = {}
    for key, scores, errors in parts:
        arrays, seen = collected.get(key, ([], 0))
        collected[key] = ([*arrays, scores], seen + errors)
    found = {
        key: ScoreSummary(*key, np.concatenate(arrays), errors, thresholds.get(key[0]))
        for key, (arrays, errors) in collected.items()
    }
    names = list(thresholds) + sorted({c for c, _ in found} - set(thresholds))
    return [
        found[(n, t)]
        for n in names
        for t in (*ALL_TARGETS, *sorted({t for _, t in found} - set(ALL_TARGETS)))
        if (n, t) in found
    ]


def funnel_rules(funnel: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(reason, rows with it as first reason, rows that have it at all), most frequent first."""
    first = funnel.get("rejected_by_reason", {})
    hits = funnel.get("reason_hits", first)
    reasons = sorted(set(first) | set(hits), key=lambda r: (-first.get(r, 0), -hits.get(r, 0), r))
    return [(r, int(first.get(r, 0)), int(hits.get(r, first.get(r, 0)))) for r in reasons]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_score_plots(
    folder: str | Path,
    recipe: Recipe | None = None,
    out_dir: str | Path | None = None,
    summaries: list[ScoreSummary] | None = None,
) -> list[str]:
    """One PNG per classifier (a histogram per target, threshold marked) of the rows of ``folder``
    (or of ``summaries`` of them, when the caller has them), into ``folder/plots`` or ``out_dir``;
    returns the paths written relative to ``folder`` (with ``out_dir``: the full paths)."""
    from bsafe_data.plots import draw, scores_figure

    folder = Path(folder)
    recipe = recipe or load_recipe(folder / "recipe.yaml")
    if summaries is None:
        summaries = score_summaries(folder, recipe)
    plot_dir = Path(out_dir) if out_dir is not None else folder / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for stale in plot_dir.glob("scores_*.png"):
        stale.unlink()
    written = []
    by_classifier: dict[str, list[ScoreSummary]] = {}
    for s in summaries:
        by_classifier.setdefault(s.classifier, []).append(s)
    for name, group in by_classifier.items():
        rel = f"{SCORE_PLOT_PREFIX}{_safe_name(name)}.png"
        path = plot_dir / rel.split("/", 1)[1]
        draw(path, scores_figure, name, [(s.target, s.scores, s.threshold) for s in group])
        written.append(str(path) if out_dir is not None else rel)
    return written


def stats(folder: str | Path, plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Funnel per rule and score summaries of a folder; with ``plots_dir`` the score histograms are
    written there (``plots`` lists them). The folder itself is never changed: ``FolderError`` for
    a folder that does not verify, and for a ``plots_dir`` inside it or that is a file."""
    from bsafe_data.integrity import FolderError, checked, require_outside

    folder = Path(folder)
    checked(folder)
    if plots_dir is not None:
        require_outside(folder, plots_dir, "--plots")
        if Path(plots_dir).exists() and not Path(plots_dir).is_dir():
            raise FolderError(f"--plots {plots_dir} is a file: give a folder for the histograms")
    recipe = load_recipe(folder / "recipe.yaml")
    manifest = json.loads((folder / "manifest.json").read_text())
    written = write_score_plots(folder, recipe, plots_dir) if plots_dir is not None else []
    return {
        "funnel": manifest["funnel"],
        "rules": funnel_rules(manifest["funnel"]),
        "scores": score_summaries(folder, recipe),
        "plots": written,
    }
