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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Features

from bsafe_data.audit.apply import REASON as ANNOTATOR_REJECTED
from bsafe_data.audit.apply import Policy, annotator_rejections
from bsafe_data.classify.base import ERROR_LABEL
from bsafe_data.classify.rules import FILTER_REASONS, RuleSet, requested_category
from bsafe_data.columnar import (
    Gatherer,
    PatchedColumn,
    bulk_memory,
    list_entries,
    read_folder,
    replace_list_field,
    struct_field,
    taken,
)
from bsafe_data.integrity import checked
from bsafe_data.recipe import Recipe, RecipeError
from bsafe_data.registry import load_recipe, method_class
from bsafe_data.rows import rejected_features
from bsafe_data.stages.dedupe import find_duplicates
from bsafe_data.stages.sample import split_of as sample_split
from bsafe_data.stages.stats import ChunkStats, funnel_of, merge_stats
from bsafe_data.stats import entry_scores, summarised
from bsafe_data.writer import ChunkFolders, RowParts, write_dataset_folder

if TYPE_CHECKING:
    from bsafe_data.methods.base import Method


#: relabelled rows turned into dicts at a time
_RELABEL_BATCH = 20_000


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
    """Where each stored row sat in the build: its source row's position in the run, its chunk.

    ``counts``: rows read per source dataset (every source row left at least one row, so its
    largest stored ``source.index`` + 1)."""

    def __init__(self, recipe: Recipe, counts: dict[str, int]):
        self.offsets: dict[str, int] = {}
        total = 0
        for spec in recipe.sources:  # a published recipe names each source by its identity
            name = spec.name or spec.location
            if name not in self.offsets:
                self.offsets[name] = total
                total += counts.get(name, 0)
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


def refilter(
    folder: str | Path, overrides: list[str] | None = None, *, audit: Policy | None = None
) -> RefilterResult:
    """Re-apply ``filters`` (from the folder's recipe plus ``overrides``) to the recorded scores;
    with ``audit`` (a policy) also reject the kept rows annotators judged bad. A folder that does
    not verify (an edited or missing shard, a file the build did not write) raises ``FolderError``
    and is left as it is.

    Columnar: the rows stay one Arrow table (``bsafe_data.columnar``), the rules run once per
    distinct score signature (``RuleSet.decide_table``), order and counters are sorts and
    group-bys; only relabelled rows become dicts. The bytes are those of a row-by-row refilter.
    """
    with bulk_memory():
        return _refilter(Path(folder), list(overrides or []), audit)


def _refilter(folder: Path, overrides: list[str], audit: Policy | None) -> RefilterResult:
    from bsafe_data.audit.report import card_section
    from bsafe_data.executor.output import OutputFolder, os_error_message

    started = time.perf_counter()
    manifest_path = folder / "manifest.json"
    # FolderError unless the folder is what its build wrote: a refilter must not launder an
    # edited shard into a new manifest, and a file the build did not write (a user's own) is
    # named and kept, never swapped away with the old folder
    checked(folder)
    _check_overrides(overrides)
    try:
        old = load_recipe(folder / "recipe.yaml")
        new = load_recipe(folder / "recipe.yaml", overrides)
    except RecipeError as exc:
        raise RefilterError(str(exc)) from None
    method = method_class(old)
    manifest = json.loads(manifest_path.read_text())
    judged_bad = annotator_rejections(folder, audit) if audit else {}
    table, stored = read_folder(folder, method.features)
    entries = list_entries(table.column("scores").combine_chunks())
    _check_classifiers(old, new, set(entries["classifier"].unique().to_list()))
    rules = method.rules_for(new)
    frame = _row_frame(table)
    order = SourceOrder(old, dict(frame.group_by("dataset").agg(pl.col("index").max() + 1).iter_rows()))
    position = pl.col("dataset").replace_strict(order.offsets, return_dtype=pl.Int64) + pl.col("index")
    frame = frame.with_columns(position.alias("position"))
    frame = frame.with_columns((pl.col("position") // order.chunk_rows).alias("chunk"))
    sort_keys = _order_columns(method, table, frame, order)

    # the rules: rows rejected before classification keep their reasons
    rows = np.flatnonzero(_redecided(table))
    scores = _relabeled_scores(table.column("scores"), entries, rules, rows)
    table = table.set_column(table.schema.get_field_index("scores"), "scores", scores)
    decided = rules.decide_table(table, rows)
    reasons, detail = PatchedColumn(table.column("reasons")), PatchedColumn(table.column("detail"))
    per_group = pa.array([d.reasons for d in decided.decisions], pa.list_(pa.string()))
    reasons.set(rows, per_group.take(pa.array(decided.groups)))
    pairs = zip(decided.decisions, decided.examples, strict=True)
    carried = [d.category or requested_category(r) for d, r in pairs]
    relabel_rows, relabel_to = _to_relabel(frame, rows, decided.groups, carried)
    relabeled = _relabeled(method, new, table, relabel_rows, relabel_to)
    if len(relabel_rows):
        categories = frame["category"].to_numpy().astype(object)
        categories[relabel_rows] = relabel_to
        frame = frame.with_columns(pl.Series("category", categories.tolist(), dtype=pl.Utf8))

    moved = 0
    if judged_bad:
        empty = _lengths(reasons.array()) == 0
        judged = np.flatnonzero(_is_in(table.column("id"), list(judged_bad)) & empty)
        reasons.set(judged, [[ANNOTATOR_REJECTED]] * len(judged))
        detail.set(judged, [judged_bad[i] for i in frame["id"].to_numpy()[judged].tolist()])
        moved = len(judged)
    frame = frame.with_row_index("_r").sort(sort_keys, maintain_order=True)
    if new.filters.enabled:
        # annotator-rejected rows still hold their place: their duplicates stay rejected
        duplicates = _duplicates(rules, table, frame, reasons.array())
        if duplicates:
            found = np.array(sorted(duplicates), dtype=np.int64)
            codes = sorted(set(duplicates.values()))
            which = pa.array([codes.index(duplicates[i]) for i in found.tolist()], pa.int64())
            reasons.set(found, pa.array([[c] for c in codes], pa.list_(pa.string())).take(which))
    final = reasons.array()
    table = table.set_column(table.schema.get_field_index("reasons"), "reasons", final)
    table = table.set_column(table.schema.get_field_index("detail"), "detail", detail.array())
    kept = _lengths(final) == 0
    frame = frame.with_columns(
        _splits(old, frame, kept, stored),
        pl.Series("kept", kept[frame["_r"].to_numpy()]),
    )
    combined, frame = _with_relabeled(table, frame, relabeled, relabel_rows)

    output = OutputFolder(folder, old.name, force=True)
    with output.locked():
        work = output.work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            repaired = int(manifest.get("funnel", {}).get("repaired_boundaries", 0))
            chunk_rows, parts = _chunk_parts(method, work, combined, frame, repaired)
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
                chunk_rows,
                new,
                total,
                funnel,
                usage=manifest.get("usage", {}),
                client_usage=manifest.get("usage_by_client"),
                timings={**manifest.get("timings", {}), **timings},
                manifest_extra=note,
                audit=card_section(folder),
                scores=summarised(entry_scores(table.column("scores")), new),  # every row's, as read
            )
            output.write_marker(staging, new.sha256())
            output.commit()
        except OSError as exc:
            output.discard()
            raise RefilterError(os_error_message(exc, f"rewriting {folder}")) from None
        finally:
            output.finish()
    was_kept = stored != "rejected"
    return RefilterResult(
        folder=folder,
        before=manifest.get("funnel", {}),
        after=funnel,
        newly_rejected=int(np.count_nonzero(was_kept & ~kept)),
        newly_kept=int(np.count_nonzero(~was_kept & kept)),
        relabeled=len(relabel_rows),
        seconds=round(time.perf_counter() - started, 3),
        annotator_rejected=moved,
    )


# -- the steps, on columns ----------------------------------------------------------------------
def _row_frame(table: pa.Table) -> pl.DataFrame:
    """The light columns refilter orders and counts by (one row per table row, in table order)."""
    source = table.column("source").combine_chunks()
    injection = table.column("injection").combine_chunks()
    segments = pc.list_value_length(table.column("segments"))  # chunk by chunk: no copy of the texts
    return pl.DataFrame(
        {
            "id": pl.from_arrow(table.column("id")),
            "kind": pl.from_arrow(table.column("kind")),
            "dataset": pl.from_arrow(struct_field(source, "dataset")),
            "index": pl.from_arrow(struct_field(source, "index")).cast(pl.Int64),
            "revision": pl.from_arrow(struct_field(source, "revision")),
            "segments": pl.from_arrow(segments).fill_null(0),
            "has_injection": pl.Series(injection.is_valid().to_numpy(zero_copy_only=False)),
            "category": pl.from_arrow(struct_field(injection, "category")),
        }
    )


def _lengths(lists: pa.Array) -> np.ndarray:
    return pc.list_value_length(lists).fill_null(0).to_numpy()


def _redecided(table: pa.Table) -> np.ndarray:
    """Rows whose reasons are all filter reasons (or none): the rules decide them again."""
    reasons = table.column("reasons").combine_chunks()
    other = ~pc.is_in(pc.list_flatten(reasons), pa.array(FILTER_REASONS)).to_numpy(zero_copy_only=False)
    out = np.ones(len(reasons), dtype=bool)
    out[pc.list_parent_indices(reasons).to_numpy()[other]] = False
    return out


def _relabeled_scores(
    scores: pa.ChunkedArray, entries: pl.DataFrame, rules: RuleSet, rows: np.ndarray
) -> pa.Array:
    """Labels at the new thresholds (as a fresh build would record them) on the rows in ``rows``;
    error labels stay. ``entries``: the flattened ``scores`` (``columnar.list_entries``)."""
    thresholds = {name: float(np.float32(spec.threshold)) for name, spec in rules.specs.items()}
    redecided = np.zeros(len(scores), dtype=bool)
    redecided[rows] = True
    threshold = pl.col("classifier").replace_strict(thresholds, default=None, return_dtype=pl.Float32)
    change = (
        pl.lit(redecided[entries["r"].to_numpy()])
        & threshold.is_not_null()
        & (pl.col("label") != ERROR_LABEL)
    )
    labels = entries.select(
        pl.when(change)
        .then(pl.when(pl.col("score") >= threshold).then(pl.lit("unsafe")).otherwise(pl.lit("safe")))
        .otherwise(pl.col("label"))
        .alias("label")
    )["label"]
    if labels.equals(entries["label"]):
        return scores.combine_chunks()
    return replace_list_field(scores, "label", labels.to_arrow().cast(pa.string()))


def _to_relabel(
    frame: pl.DataFrame, rows: np.ndarray, groups: np.ndarray, carried: list[str | None]
) -> tuple[np.ndarray, list[str]]:
    """Decided rows with an injection whose category changes: (rows, new categories)."""
    if not len(rows):
        return np.empty(0, dtype=np.int64), []
    wanted = np.array(carried + [None], dtype=object)[groups]
    current = frame["category"].to_numpy().astype(object)[rows]
    injected = frame["has_injection"].to_numpy()[rows]
    change = (
        np.array(
            [bool(w) and w != c for w, c in zip(wanted.tolist(), current.tolist(), strict=True)], dtype=bool
        )
        & injected
    )
    return rows[change], wanted[change].tolist()


def _order_columns(
    method: type[Method], table: pa.Table, frame: pl.DataFrame, order: SourceOrder
) -> list[Any]:
    """Sort keys for ``frame`` (in table order) giving the build's order: (chunk, order_key).

    The method's ``row_order`` declaration decides: by id or by ``…/vN`` variant (after rejected
    source rows, by source position) is evaluated on columns; a method's own ``order_key``
    (``row_order`` None) on the rows themselves."""
    level = (pl.col("segments") > 0).cast(pl.Int64)
    if method.row_order == "id":
        return [pl.col("chunk"), level, pl.col("position"), pl.col("id")]
    ids = frame["id"]
    if method.row_order == "variant" and not ids.str.contains("\n").any():
        digits = pl.col("id").str.extract(r"/v([0-9]+)$", 1)  # `\d` in re is Unicode: checked below
        plain = (
            frame.select(digits.is_not_null().sum()).item()
            == frame.select(pl.col("id").str.contains(r"/v\d+$").sum()).item()
        )
        if plain:
            variant = pl.when(pl.col("segments") > 0).then(digits.cast(pl.Int64)).otherwise(-1).fill_null(-1)
            return [pl.col("chunk"), level, pl.col("position"), variant]
    return _hook_order(method, table, order)


def _hook_order(method: type[Method], table: pa.Table, order: SourceOrder) -> list[Any]:
    """The sort key from ``order_key`` on every row (a dict each): any hook, slowly."""
    rows = table.to_pylist()
    keys = [(order.chunk(row), *method.order_key(row, order.position(row))) for row in rows]
    ranks = np.empty(len(rows), dtype=np.int64)
    ranks[sorted(range(len(rows)), key=keys.__getitem__)] = np.arange(len(rows))
    return [pl.Series("_key", ranks)]


def _duplicates(rules: RuleSet, table: pa.Table, frame: pl.DataFrame, reasons: pa.Array) -> dict[int, str]:
    """Row -> duplicate reason for kept injected rows whose violation repeats an earlier kept one
    (``frame`` in dataset order). Annotator-rejected rows count as kept here, but keep their reason."""
    index = rules.new_dedupe()
    if not index.active:
        return {}
    lengths = _lengths(reasons)
    first = pc.list_element(
        pc.if_else(pa.array(lengths == 1), reasons, pa.nulls(len(reasons), reasons.type)), 0
    )
    judged = pc.equal(first, ANNOTATOR_REJECTED).fill_null(False).to_numpy(zero_copy_only=False)
    order = frame["_r"].to_numpy()
    free = (lengths == 0) | judged
    injected = (frame["kind"].to_numpy() == "injected") & frame["has_injection"].to_numpy()
    candidates = order[free[order] & injected]
    if not len(candidates):
        return {}
    ids = table.column("id").take(pa.array(candidates)).to_pylist()
    violations = struct_field(taken(table.column("injection"), candidates), "violation").to_pylist()
    light = (
        {"id": i, "kind": "injected", "injection": {"violation": v}, "reasons": []}
        for i, v in zip(ids, violations, strict=True)
    )
    found = find_duplicates(index, light)
    if not found:
        return {}
    ids = table.column("id")
    hit = np.flatnonzero(_is_in(ids, list(found)) & ~judged)
    return {r: found[i] for r, i in zip(hit.tolist(), ids.take(pa.array(hit)).to_pylist(), strict=True)}


def _is_in(values: pa.ChunkedArray, wanted: list[str]) -> np.ndarray:
    """Per value: whether it is one of ``wanted``."""
    found = pc.is_in(values, value_set=pa.array(wanted, pa.string()))
    return found.combine_chunks().to_numpy(zero_copy_only=False)


def _splits(old: Recipe, frame: pl.DataFrame, kept: np.ndarray, stored: np.ndarray) -> pl.Series:
    """train/test of each row of ``frame`` (by its source row) when kept, else null.

    A source row's split is a function of the built recipe: the split a kept row of it was stored
    in, else drawn (``split_of``) for the source rows that had no kept row before."""
    rows = frame["_r"].to_numpy()
    keep = pl.Series(kept[rows])
    on = ["dataset", "revision", "index"]
    sources = frame.select(on).with_columns(pl.Series("stored", stored[rows]))
    known = sources.filter(pl.col("stored") != "rejected").unique(on, keep="first")
    wanted = sources.filter(keep).select(on).unique(maintain_order=True)
    new = wanted.join(known, on=on, how="anti")
    drawn = [sample_split(old.seed, old.split.test_fraction, d, r, i) for d, r, i in new.iter_rows()]
    new = new.with_columns(pl.Series("split", drawn, pl.Utf8))
    pairs = pl.concat([known.rename({"stored": "split"}), new])
    found = sources.with_row_index("_i").join(pairs, on=on, how="left").sort("_i")
    return pl.select(pl.when(keep).then(found["split"]).otherwise(None)).to_series().alias("split")


def _relabeled(
    method: type[Method], recipe: Recipe, table: pa.Table, rows: np.ndarray, categories: list[str]
) -> pa.Table:
    """Rows ``rows`` given ``categories`` by the method's ``relabel`` hook (on row dicts, a
    batch at a time so memory stays bounded)."""
    gather_rows = Gatherer(table)
    parts = [table.schema.empty_table()]
    for start in range(0, len(rows), _RELABEL_BATCH):
        batch = gather_rows(rows[start : start + _RELABEL_BATCH]).to_pylist()
        for row, category in zip(batch, categories[start : start + _RELABEL_BATCH], strict=True):
            method.relabel(recipe, row, category)
        parts.append(pa.Table.from_pylist(batch, schema=table.schema))
    return pa.concat_tables(parts)


def _with_relabeled(
    table: pa.Table, frame: pl.DataFrame, patched: pa.Table, rows: np.ndarray
) -> tuple[pa.Table, pl.DataFrame]:
    """The table with the relabelled rows ``patched`` appended (with their final reasons and
    detail) and ``frame`` with each row's place in it (``src``)."""
    source = frame["_r"].to_numpy().copy()
    if not patched.num_rows:
        return table, frame.with_columns(pl.Series("src", source))
    for name in ("reasons", "detail"):
        patched = patched.set_column(
            patched.schema.get_field_index(name), name, table.column(name).take(pa.array(rows))
        )
    moved = np.full(table.num_rows, -1, dtype=np.int64)
    moved[rows] = table.num_rows + np.arange(len(rows))
    source = np.where(moved[source] >= 0, moved[source], source)
    return pa.concat_tables([table, patched]), frame.with_columns(pl.Series("src", source))


def _chunk_parts(
    method: type[Method], work: Path, table: pa.Table, frame: pl.DataFrame, repaired: int
) -> tuple[RowParts, list[ChunkStats]]:
    """The rows of one chunk per build chunk (``frame`` in dataset order, ``src`` its table rows)
    for the writer, and each chunk's counters.

    From columns when the method counts rows as a ``_counts_columns`` twin says (the writer
    gathers each chunk's rows from ``table`` as it encodes them: nothing is written twice), else
    chunk folders in ``work`` built through ``chunk_from_rows``."""
    from bsafe_data.executor.local import write_chunk

    count = _counts_columns(method)
    counters = _chunk_counters(frame, table, count) if count is not None else {}
    sources = dict(frame.group_by("chunk").agg(pl.struct("dataset", "index").n_unique()).iter_rows())
    gathered = GatheredChunks(table, method.features)
    rows_of = gathered.gather
    paths: list[Path] = []
    parts: list[ChunkStats] = []
    for position, (index, start, end) in enumerate(_runs(frame["chunk"].to_numpy())):
        part = frame.slice(start, end - start)
        src = part["src"].to_numpy()
        if count is not None:
            stats = counters[index]
            splits = part["split"]
            for split in ("train", "test"):
                gathered.add(split, src[(splits == split).fill_null(False).to_numpy()])
            gathered.add("rejected", src[~part["kept"].to_numpy()])
        else:
            rows = rows_of(src).to_pylist()
            split_of = {r["id"]: s for r, s in zip(rows, part["split"].to_list(), strict=True) if s}
            out = method.chunk_from_rows(rows, split_of)
            stats = out.stats
            paths.append(write_chunk(work, index, out, method.features))
        stats.source_rows = sources[index]
        if position == 0:
            stats.repaired = repaired
        parts.append(stats)
    return (gathered if count is not None else ChunkFolders(paths)), parts


class GatheredChunks:
    """``RowParts`` taken from the refiltered table: each chunk's table rows per file, gathered
    (``Gatherer``: read-only, so shards can be encoded on several threads) when the writer asks."""

    def __init__(self, table: pa.Table, features: Features):
        self.gather = Gatherer(table)
        self.schemas = {
            "train": features.arrow_schema,
            "test": features.arrow_schema,
            "rejected": rejected_features(features).arrow_schema,
        }
        self.rows: dict[str, list[np.ndarray]] = {name: [] for name in self.schemas}

    def add(self, name: str, rows: np.ndarray) -> None:
        """The next chunk's rows of file ``name`` (table row numbers, in order)."""
        self.rows[name].append(rows)

    def sizes(self, name: str) -> list[int]:
        return [len(rows) for rows in self.rows.get(name, [])]

    def read(self, name: str, part: int, columns: list[str] | None = None) -> pa.Table:
        table = _shaped(self.gather(self.rows[name][part]), self.schemas[name])
        return table if columns is None else table.select(columns)


def _shaped(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns of ``schema`` in its types (dictionary columns decoded), carrying its
    metadata (the ``datasets`` features)."""
    return table.select(schema.names).cast(schema.remove_metadata()).replace_schema_metadata(schema.metadata)


# -- counters -----------------------------------------------------------------------------------
CountColumns = Callable[[pl.DataFrame, pa.Table, dict[int, ChunkStats]], None]


def _counts_columns(method: type[Method]) -> CountColumns | None:
    """The columnar twin of the method's row counters, when chunks can be counted and written from
    columns: no extra configs, and counters the method declares (``counts``). None: the chunk is
    rebuilt from row dicts (``chunk_from_rows``)."""
    counts = method.counts
    if method.extra_configs or counts is None:
        return None

    def count(kept: pl.DataFrame, table: pa.Table, stats: dict[int, ChunkStats]) -> None:
        _count_injections(counts, kept, table, stats)

    return count


def _count_injections(
    counts: frozenset[str], kept: pl.DataFrame, table: pa.Table, stats: dict[int, ChunkStats]
) -> None:
    """``Method.count_row`` on columns: of kept rows with an injection, in row order, what
    ``counts`` names: categories, rounded positions, X per tokenizer."""
    rows = kept.filter(pl.col("has_injection"))
    if not rows.height or not counts:
        return
    if "categories" in counts:
        for chunk, category, n in rows.group_by(["chunk", "category"], maintain_order=True).len().iter_rows():
            stats[chunk].categories[category] = n
    src = rows["src"].to_numpy()
    chunks = rows["chunk"].to_numpy()
    if "positions" in counts:
        injection = taken(table.column("injection"), src)
        positions = [round(p, 4) for p in struct_field(injection, "relative_position").to_pylist()]
        for chunk, start, end in _runs(chunks):
            stats[chunk].positions.extend(positions[start:end])
    backtrack = list_entries(taken(table.column("backtrack"), src))
    if "backtrack" in counts and backtrack.height:
        backtrack = backtrack.with_columns(pl.Series("chunk", chunks[backtrack["r"].to_numpy()]))
        grouped = backtrack.group_by(["chunk", "tokenizer"], maintain_order=True).agg(pl.col("tokens"))
        for chunk, tokenizer, tokens in grouped.iter_rows():
            stats[chunk].backtrack[tokenizer] = list(tokens)


def _runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """(value, start, end) of each run of equal values."""
    if not len(values):
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(values)) + 1])
    ends = np.concatenate([starts[1:], [len(values)]])
    return [(int(values[a]), int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def _chunk_counters(frame: pl.DataFrame, table: pa.Table, count: CountColumns) -> dict[int, ChunkStats]:
    """Each chunk's counters, as ``Method.emit`` counts rows one by one (``frame`` in dataset
    order): kept per split and kind, rejected by first reason and every reason, the method's."""
    stats = {chunk: ChunkStats() for chunk, _, _ in _runs(frame["chunk"].to_numpy())}
    kept = frame.filter(pl.col("kept"))
    for chunk, split, n in kept.group_by(["chunk", "split"], maintain_order=True).len().iter_rows():
        stats[chunk].kept[split] = n
    for chunk, kind, n in kept.group_by(["chunk", "kind"], maintain_order=True).len().iter_rows():
        stats[chunk].kinds[kind] = n
    rejected = frame.filter(~pl.col("kept"))
    if rejected.height:
        reasons = pl.from_arrow(taken(table.column("reasons"), rejected["src"].to_numpy()))
        rejected = rejected.select("chunk").with_columns(reasons.alias("reasons"))
        for chunk, n in rejected.group_by("chunk", maintain_order=True).len().iter_rows():
            stats[chunk].rejected = n
        first = rejected.with_columns(pl.col("reasons").list.first().alias("reason"))
        for chunk, reason, n in first.group_by(["chunk", "reason"], maintain_order=True).len().iter_rows():
            stats[chunk].rejected_by_reason[reason] = n
        hits = rejected.explode("reasons")
        for chunk, reason, n in hits.group_by(["chunk", "reasons"], maintain_order=True).len().iter_rows():
            stats[chunk].reason_hits[reason] = n
    count(kept, table, stats)
    return stats
