"""Write the Hub-layout dataset folder from finished chunks (README "Set-up", ARCHITECTURE.md).

``data/{split}-0000i-of-0000N.parquet`` for config ``default``, ``rejected/train-…`` for the
rejected config, ``README.md`` (card), ``recipe.yaml`` (resolved), ``manifest.json``, ``plots/``.
Parquet output is a deterministic function of the chunks: same recipe and seed, same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from bsafe_data import __version__
from bsafe_data.integrity import file_entries
from bsafe_data.recipe import Recipe
from bsafe_data.rows import SCHEMA_VERSION, rejected_features
from bsafe_data.sources import published_sources
from bsafe_data.stages.sample import fifths_histogram
from bsafe_data.tokenization import public_ref

if TYPE_CHECKING:
    from bsafe_data.stats import EntryScores, ScoreSummary

#: Upstream Hub ids of the bundled tokenizers (tests/fixtures/tokenizers/PROVENANCE.md).
UPSTREAM_TOKENIZERS = {
    "builtin:qwen2.5": "Qwen/Qwen2.5-0.5B-Instruct",
    "builtin:phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
}


#: Rows per parquet shard: keeps shards well under the Hub's 500 MB guideline.
SHARD_ROWS = 50_000
#: Rows per row group: the grid restarts at each part (build chunk), so a shard's row groups are
#: the same whichever executor or refilter produced its parts.
_ROW_GROUP = 2_000
#: Shards encoded at once: Arrow's parquet encoder and zstd release the GIL, so threads use the cores.
_SHARD_THREADS = max(1, min(4, os.cpu_count() or 1))


class RowParts(Protocol):
    """The rows of a dataset's files, in order, as consecutive parts (one per build chunk).

    ``name`` is a chunk file's stem: ``train``, ``test``, ``rejected`` or ``CONFIG-SPLIT`` for a
    method's extra configs."""

    def sizes(self, name: str) -> list[int]:
        """Rows of each part of ``name``, in order (0 for a part without such rows)."""
        ...

    def read(self, name: str, part: int, columns: list[str] | None = None) -> pa.Table:
        """The rows of part ``part`` of ``name``, in the columns of its dataset file (or only
        ``columns`` of them)."""
        ...


class ChunkFolders:
    """``RowParts`` of finished chunk folders (``{name}.parquet`` in each, absent when empty)."""

    def __init__(self, chunks: list[Path]):
        self.chunks = chunks

    def sizes(self, name: str) -> list[int]:
        files = [chunk / f"{name}.parquet" for chunk in self.chunks]
        return [pq.ParquetFile(f).metadata.num_rows if f.exists() else 0 for f in files]

    def read(self, name: str, part: int, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.chunks[part] / f"{name}.parquet", columns=columns)


def upstream_tokenizer(ref: str) -> str:
    """The Hub id or path to load ``ref`` with outside bsafe-data (bundled ones: their upstream id)."""
    return UPSTREAM_TOKENIZERS.get(ref, ref)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


#: one shard's rows: (part, first row, end row) slices of consecutive parts
_Pieces = list[tuple[int, int, int]]


def _shard_pieces(sizes: list[int]) -> list[_Pieces]:
    """The parts' rows cut into shards of ``SHARD_ROWS`` (the last one shorter; one when empty)."""
    shards: list[_Pieces] = [[]]
    room = SHARD_ROWS
    for part, size in enumerate(sizes):
        start = 0
        while start < size:
            if not room:
                shards.append([])
                room = SHARD_ROWS
            end = min(size, start + room)
            shards[-1].append((part, start, end))
            room -= end - start
            start = end
    return shards


def _write_shard(rows: RowParts, name: str, pieces: _Pieces, schema: pa.Schema, path: Path) -> None:
    """One shard from its pieces; a row group ends every ``_ROW_GROUP`` rows of a part and at a
    piece's end. Written to a temp file, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for part, start, end in pieces:
            table = rows.read(name, part)
            grid = range(start - start % _ROW_GROUP + _ROW_GROUP, end, _ROW_GROUP)
            at = start
            for cut in [*grid, end]:
                writer.write_table(table.slice(at, cut - at), row_group_size=_ROW_GROUP)
                at = cut
    os.replace(tmp, path)


class _ShardJobs:
    """Every shard of a dataset folder, planned first and then encoded on ``_SHARD_THREADS``."""

    def __init__(self, rows: RowParts):
        self.rows = rows
        self.jobs: list[tuple[str, _Pieces, pa.Schema, Path]] = []

    def add(self, name: str, sizes: list[int], schema: pa.Schema, folder: Path, split: str) -> list[str]:
        """Plan ``folder/split-i-of-N.parquet`` from the parts of ``name``; returns relative paths."""
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{split}-*.parquet"):
            stale.unlink()
        shards = _shard_pieces(sizes)
        names = [f"{split}-{i:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
        self.jobs += [(name, pieces, schema, folder / n) for pieces, n in zip(shards, names, strict=True)]
        return [f"{folder.name}/{n}" for n in names]

    @contextmanager
    def running(self) -> Iterator[None]:
        """Encode the planned shards while the block runs; all are written when it ends."""
        with ThreadPoolExecutor(max_workers=_SHARD_THREADS) as pool:
            futures = [pool.submit(_write_shard, self.rows, *job) for job in self.jobs]
            try:
                yield
            finally:
                for done in futures:
                    done.result()


def _part_scores(rows: RowParts) -> Iterator[EntryScores]:
    """``stats.entry_scores`` of every part of the default and rejected configs' files."""
    from bsafe_data.stats import entry_scores

    for name in ("train", "test", "rejected"):
        for part, size in enumerate(rows.sizes(name)):
            if size:
                yield from entry_scores(rows.read(name, part, ["scores"]).column("scores"))


def _written_splits(per_split: dict[str, list[int]]) -> dict[str, list[int]]:
    """The splits of a config that get shards (their part sizes): those with rows, and train when
    every split is empty, so an (allowed) empty build still has the config and ``load_dataset``
    never serves another."""
    empty = not any(sum(sizes) for sizes in per_split.values())
    return {split: sizes for split, sizes in per_split.items() if sum(sizes) or (split == "train" and empty)}


def _examples(parts: RowParts, names: list[str], n: int = 3) -> list[dict[str, Any]]:
    """Up to n of the first 200 train rows for the card: injected first, then clean (other kinds:
    one row of each). ``names``: the dataset's columns."""
    wanted = [c for c in ("id", "kind", "prompt", "completion", "injection") if c in names]
    rows: list[dict[str, Any]] = []
    for part, size in enumerate(parts.sizes("train")):
        if len(rows) >= 200:
            break
        if not size:
            continue
        for row in parts.read("train", part, wanted).slice(0, 200 - len(rows)).to_pylist():
            if isinstance(row["prompt"], list):  # conversational prompt (prompt sets): as text
                row["prompt"] = "\n".join(f"{m['role']}: {m['content']}" for m in row["prompt"])
            row.setdefault("completion", "")
            rows.append(row)
    injected = [r for r in rows if r["kind"] == "injected"][: n - 1]
    clean = [r for r in rows if r["kind"] == "clean"][: n - len(injected)]
    if injected or clean:
        return injected + clean
    first_of_kind = {}  # methods with other kinds: the first row of each kind
    for row in rows:
        first_of_kind.setdefault(row["kind"], row)
    return list(first_of_kind.values())[:n]


def write_dataset_folder(
    out_dir: Path,
    rows: RowParts,
    recipe: Recipe,
    stats: Any,
    funnel: dict[str, Any],
    *,
    usage: dict[str, Any],
    timings: dict[str, float],
    client_usage: dict[str, dict[str, Any]] | None = None,
    manifest_extra: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
    scores: list[ScoreSummary] | None = None,
) -> dict[str, dict[str, int]]:
    """Write shards from ``rows`` (the finished chunks' rows, in order: ``ChunkFolders``), card,
    recipe and manifest; returns row counts per config and split. ``audit``: the card's "Audit"
    figures (read from the target folder by the caller: ``out_dir`` is a staging folder).
    ``usage``: the generator's counters; ``client_usage``: every client's (``Resources.usage``).
    ``scores``: the rows' score summaries when the caller holds them (refilter), else they are
    read from the parts' ``scores`` columns."""
    from bsafe_data.card import render_card
    from bsafe_data.registry import method_class
    from bsafe_data.stats import summarised, write_score_plots

    method = method_class(recipe)  # its `features` are the shards' columns
    recipe = recipe.model_copy(update={"sources": published_sources(recipe.sources)})
    counts: dict[str, dict[str, int]] = {"default": {}, "rejected": {}}
    files: dict[str, dict[str, list[str]]] = {"default": {}, "rejected": {}}
    shards = _ShardJobs(rows)
    # (config, folder, the rows' part-name prefix, features): the kept rows, then the method's
    # extra configs (DPO pairs: CONFIG/…); their splits follow one rule (``_written_splits``)
    configs = [("default", "data", "", method.features)]
    configs += [(name, name, f"{name}-", features) for name, features in method.extra_configs.items()]
    for config, folder, prefix, features in configs:
        per_split = {split: rows.sizes(prefix + split) for split in ("train", "test")}
        for split, sizes in _written_splits(per_split).items():
            counts.setdefault(config, {})[split] = sum(sizes)
            files.setdefault(config, {})[split] = shards.add(
                prefix + split, sizes, features.arrow_schema, out_dir / folder, split
            )
    rejected = rows.sizes("rejected")
    if sum(rejected):
        counts["rejected"]["train"] = sum(rejected)
        schema = rejected_features(method.features).arrow_schema
        files["rejected"]["train"] = shards.add("rejected", rejected, schema, out_dir / "rejected", "train")
    # while the shards encode (threads) and the figures are drawn (the plotter process), the
    # card is written from the parts; only the files' hashes wait for both
    with shards.running():
        plots = method.plots(out_dir, stats)
        summaries = scores if scores is not None else summarised(_part_scores(rows), recipe)
        plots += write_score_plots(out_dir, recipe, summaries=summaries)
        max_x = {name: max(values) for name, values in stats.backtrack.items() if values}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "package": "bsafe-data",
            "package_version": __version__,
            "recipe_name": recipe.name,
            "recipe_version": recipe.version,
            "recipe_sha256": recipe.sha256(),
            "method": recipe.method,
            "seed": recipe.seed,
            "generator": {"provider": recipe.generator.provider, "model": recipe.generator.model},
            "tokenizers": {
                "primary": public_ref(recipe.tokenizers.primary),
                "all": [public_ref(ref) for ref in recipe.tokenizers.all],
                "hub_ids": {
                    public_ref(ref): public_ref(upstream_tokenizer(ref)) for ref in recipe.tokenizers.all
                },
            },
            **method.manifest_fields(recipe),
            "control_tokens": method.control_vocabulary(recipe, max_x),
            "funnel": funnel,
            "counts": counts,
            "categories": dict(sorted(stats.categories.items())),
            "position_fifths": fifths_histogram(stats.positions),
            "backtrack_max": max_x,
            "usage": usage,
            **({"usage_by_client": client_usage} if client_usage is not None else {}),
            "timings": timings,
            "complete": not stats.transient,
            "transient_rows": stats.transient,
            **(manifest_extra or {}),
        }
        examples = _examples(rows, list(method.features))
        _atomic_write_text(out_dir / "recipe.yaml", recipe.to_yaml())
        card = render_card(recipe, manifest, files, examples, plots, stats, audit=audit)
        _atomic_write_text(out_dir / "README.md", card)
    manifest["files"] = file_entries(out_dir)  # last: the manifest describes every other file
    _atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return counts
