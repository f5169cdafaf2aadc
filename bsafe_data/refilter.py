"""Re-apply filter rules to a built dataset folder from its recorded scores: zero classifier calls.

``refilter(folder, ["filters.classifiers.0.threshold=0.8"])`` reads every row (``data/`` and
``rejected/``), recomputes the filter reasons (``bsafe_data.classify.rules``) from each row's
``scores`` and spans, and rewrites the shards, ``recipe.yaml``, ``manifest.json``, the card and the
plots. Rows rejected before classification (source problems, generator failures, token boundaries)
keep their reasons. Rows are partitioned into the build's chunks and ordered as the build orders
them, so the folder is what a fresh build with the new filters would write (the parquet files are
byte-identical; cached classifier answers make that build free too).

What can change: thresholds, rules and shorthands, the category-mismatch mode and map, quality
rules, removing classifiers. What cannot (the scores are not recorded): adding a classifier or
changing anything of one but its threshold; any section other than ``filters``. Those need
``bsafe-data build`` again, which answers from the response cache.

``audit="any"|"majority"`` also moves the kept rows annotators judged bad
(``bsafe_data.audit.apply.annotator_rejections``) to ``rejected`` with reason
``annotator_rejected``. Like the reasons given before classification, that reason is never
re-decided by a later refilter; such rows keep their place in near-duplicate detection.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bsafe_data.audit.apply import REASON as ANNOTATOR_REJECTED
from bsafe_data.audit.apply import Policy, annotator_rejections
from bsafe_data.classify.base import ERROR_LABEL, is_unsafe
from bsafe_data.classify.rules import FILTER_REASONS, RuleSet, requested_category
from bsafe_data.methods.base import method_class
from bsafe_data.recipe import Recipe, RecipeError, load_recipe
from bsafe_data.stages.dedupe import find_duplicates
from bsafe_data.stages.sample import split_of as sample_split
from bsafe_data.stages.stats import funnel_of, merge_stats


class RefilterError(Exception):
    """The folder cannot be refiltered with these settings (message says why and what to do)."""


@dataclass
class RefilterResult:
    """What changed: funnels before and after, rows whose status flipped."""

    folder: Path
    before: dict[str, Any]
    after: dict[str, Any]
    newly_rejected: int
    newly_kept: int
    relabeled: int
    seconds: float
    annotator_rejected: int = 0


def _check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key != "filters" and not key.startswith("filters."):
            raise RefilterError(
                f"refilter only changes `filters`, not {key!r}: rebuild with `bsafe-data build` "
                "(cached LLM and classifier answers cost no requests)"
            )


def _check_classifiers(old: Recipe, new: Recipe, recorded: set[str]) -> None:
    before = {c.name: c for c in old.filters.classifiers} if old.filters.enabled else {}
    for spec in new.filters.classifiers if new.filters.enabled else []:
        prior = before.get(spec.name)
        if prior is None or spec.name not in recorded and recorded:
            raise RefilterError(
                f"classifier {spec.name!r} has no recorded scores in this folder: run `bsafe-data build` "
                "with the new recipe instead (cached answers cost no requests)"
            )
        a = prior.model_dump(exclude={"threshold"})
        b = spec.model_dump(exclude={"threshold"})
        if a != b:
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise RefilterError(
                f"classifier {spec.name!r} changed {changed}: only `threshold` can change without new "
                "scores; run `bsafe-data build` instead (cached answers cost no requests)"
            )


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """Every row of the folder; each gets ``_split`` (train/test/rejected) for bookkeeping."""
    rows: list[dict[str, Any]] = []
    for sub, config in (("data", None), ("rejected", "rejected")):
        for path in sorted((folder / sub).glob("*.parquet")):
            split = config or path.name.split("-", 1)[0]
            for row in pq.read_table(path).to_pylist():
                row["_split"] = split
                rows.append(row)
    return rows


class SourceOrder:
    """Where each stored row sat in the build: its source row's position in the run, its chunk."""

    def __init__(self, recipe: Recipe, rows: list[dict[str, Any]]):
        counts: Counter[str] = Counter()
        for row in rows:  # every source row left at least one row, so max index + 1 = its rows read
            src = row["source"]
            counts[src["dataset"]] = max(counts[src["dataset"]], src["index"] + 1)
        self.offsets: dict[str, int] = {}
        total = 0
        for spec in recipe.sources:
            if spec.name not in self.offsets:
                self.offsets[spec.name] = total
                total += counts.get(spec.name, 0)
        for name in sorted(counts):  # sources renamed since: after the recipe's, deterministic
            if name not in self.offsets:
                self.offsets[name] = total
                total += counts[name]
        self.chunk_rows = recipe.output.chunk_rows

    def position(self, row: dict[str, Any]) -> int:
        """The source row's place in the stream the build read."""
        return self.offsets[row["source"]["dataset"]] + row["source"]["index"]

    def chunk(self, row: dict[str, Any]) -> int:
        """The build chunk the row belongs to."""
        return self.position(row) // self.chunk_rows


def _relabel_scores(row: dict[str, Any], rules: RuleSet) -> None:
    """Labels at the new thresholds (as a fresh build would record them)."""
    for entry in row["scores"]:
        spec = rules.specs.get(entry["classifier"])
        if spec is not None and entry["label"] != ERROR_LABEL:
            entry["label"] = "unsafe" if is_unsafe(entry["score"], spec.threshold) else "safe"


def _unless_judged(row: dict[str, Any]) -> dict[str, Any]:
    """The row as dedupe should see it: an annotator rejection does not free its violation."""
    return {**row, "reasons": []} if row.get("reasons") == [ANNOTATOR_REJECTED] else row


def refilter(
    folder: str | Path, overrides: list[str] | None = None, *, audit: Policy | None = None
) -> RefilterResult:
    """Re-apply ``filters`` (from the folder's recipe plus ``overrides``) to the recorded scores;
    with ``audit`` (a policy) also reject the kept rows annotators judged bad."""
    from bsafe_data.audit.report import card_section
    from bsafe_data.executor.local import write_chunk
    from bsafe_data.executor.output import OutputFolder, os_error_message
    from bsafe_data.writer import write_dataset_folder

    started = time.perf_counter()
    folder = Path(folder)
    overrides = list(overrides or [])
    manifest_path = folder / "manifest.json"
    if not (folder / "recipe.yaml").is_file() or not manifest_path.is_file():
        raise RefilterError(f"{folder} is not a built dataset folder (recipe.yaml or manifest.json missing)")
    _check_overrides(overrides)
    try:
        old = load_recipe(folder / "recipe.yaml")
        new = load_recipe(folder / "recipe.yaml", overrides)
    except RecipeError as exc:
        raise RefilterError(str(exc)) from None
    method = method_class(old)
    manifest = json.loads(manifest_path.read_text())
    judged_bad = annotator_rejections(folder, audit) if audit else {}
    rows = read_rows(folder)
    recorded = {s["classifier"] for row in rows for s in row["scores"]}
    _check_classifiers(old, new, recorded)
    rules = method.rules_for(new)
    order = SourceOrder(old, rows)
    rows.sort(key=lambda row: (order.chunk(row), *method.order_key(row, order.position(row))))
    was_kept = {row["id"]: row["_split"] != "rejected" for row in rows}
    relabeled = 0
    for row in rows:
        reasons = row.get("reasons") or []
        if any(r not in FILTER_REASONS for r in reasons):
            continue  # rejected before classification: nothing to re-decide
        _relabel_scores(row, rules)
        decision = rules.decide(row)
        if row["injection"]:
            category = decision.category or requested_category(row)
            if category and category != row["injection"]["category"]:
                method.relabel(new, row, category)
                relabeled += 1
        row["reasons"] = decision.reasons
    moved = 0
    for row in rows:
        if row["id"] in judged_bad and not row["reasons"]:
            row["reasons"] = [ANNOTATOR_REJECTED]
            row["detail"] = judged_bad[row["id"]]
            moved += 1
    if new.filters.enabled:
        # annotator-rejected rows still hold their place: their duplicates stay rejected
        duplicates = find_duplicates(rules.new_dedupe(), (_unless_judged(row) for row in rows))
        for row in rows:
            if row["id"] in duplicates and row["reasons"] != [ANNOTATOR_REJECTED]:
                row["reasons"] = [duplicates[row["id"]]]
    by_chunk: dict[int, list[dict[str, Any]]] = {}
    sources: Counter[int] = Counter()
    seen_sources: set[tuple[str, int]] = set()
    split_of: dict[str, str] = {}
    for row in rows:
        index = order.chunk(row)
        by_chunk.setdefault(index, []).append(row)
        src = (row["source"]["dataset"], row["source"]["index"])
        if src not in seen_sources:
            seen_sources.add(src)
            sources[index] += 1
        row.pop("_split")
        split_of[row["id"]] = sample_split(
            old.seed, old.split.test_fraction, row["source"]["dataset"], row["source"]["id"]
        )
    output = OutputFolder(folder, old.name, force=True)
    with output.locked():
        work = output.work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        paths, parts = [], []
        try:
            for position, index in enumerate(sorted(by_chunk)):
                out = method.chunk_from_rows(by_chunk[index], split_of)
                out.stats.source_rows = sources[index]
                if position == 0:
                    out.stats.repaired = int(manifest.get("funnel", {}).get("repaired_boundaries", 0))
                paths.append(write_chunk(work, index, out, method.features))
                parts.append(out.stats)
            total = merge_stats(parts)
            total.source_rows = int(manifest.get("funnel", {}).get("source_rows", total.source_rows))
            funnel = funnel_of(total)
            timings = {"refilter": round(time.perf_counter() - started, 3)}
            note = {
                "refilter": {
                    "built_recipe_sha256": manifest.get("refilter", {}).get("built_recipe_sha256")
                    or manifest.get("recipe_sha256"),
                    "overrides": overrides,
                    "classifier_requests": 0,
                },
            }
            if audit:
                note["refilter"]["audit"] = {"policy": audit, "annotator_rejected": moved}
            staging = output.new_staging()
            write_dataset_folder(
                staging,
                paths,
                new,
                total,
                funnel,
                usage=manifest.get("usage", {}),
                timings={**manifest.get("timings", {}), **timings},
                manifest_extra=note,
                audit=card_section(folder),
            )
            output.write_marker(staging, new.sha256())
            output.commit()
        except OSError as exc:
            output.discard()
            raise RefilterError(os_error_message(exc, f"rewriting {folder}")) from None
        finally:
            output.finish()
    now_kept = {row["id"] for row in rows if not row.get("reasons")}
    return RefilterResult(
        folder=folder,
        before=manifest.get("funnel", {}),
        after=funnel,
        newly_rejected=sum(1 for i, k in was_kept.items() if k and i not in now_kept),
        newly_kept=sum(1 for i, k in was_kept.items() if not k and i in now_kept),
        relabeled=relabeled,
        seconds=round(time.perf_counter() - started, 3),
        annotator_rejected=moved,
    )
