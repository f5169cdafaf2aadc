"""Write the Hub-layout dataset folder from finished chunks (README "Set-up", ARCHITECTURE.md).

``data/{split}-0000i-of-0000N.parquet`` for config ``default``, ``rejected/train-…`` for the
rejected config, ``README.md`` (card), ``recipe.yaml`` (resolved), ``manifest.json``, ``plots/``.
Parquet output is a deterministic function of the chunks: same recipe and seed, same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bsafe_data import __version__
from bsafe_data.integrity import file_entries
from bsafe_data.recipe import Recipe
from bsafe_data.rows import SCHEMA_VERSION, rejected_features
from bsafe_data.stages.sample import fifths_histogram

#: Upstream Hub ids of the bundled tokenizers (tests/fixtures/tokenizers/PROVENANCE.md).
UPSTREAM_TOKENIZERS = {
    "builtin:qwen2.5": "Qwen/Qwen2.5-0.5B-Instruct",
    "builtin:phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
}


def upstream_tokenizer(ref: str) -> str:
    """The Hub id or path to load ``ref`` with outside bsafe-data (bundled ones: their upstream id)."""
    return UPSTREAM_TOKENIZERS.get(ref, ref)


#: Rows per parquet shard: keeps shards well under the Hub's 500 MB guideline.
SHARD_ROWS = 50_000
_ROW_GROUP = 2_000


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _shard_count(rows: int) -> int:
    return max(1, -(-rows // SHARD_ROWS))


def _write_shards(sources: list[Path], schema: pa.Schema, folder: Path, split: str, rows: int) -> list[str]:
    """Stream chunk files into ``folder/split-i-of-N.parquet`` shards; returns relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{split}-*.parquet"):
        stale.unlink()
    shards = _shard_count(rows)
    names = [f"{split}-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]
    batches = (
        batch
        for src in sources
        if src.exists()
        for batch in pq.ParquetFile(src).iter_batches(batch_size=_ROW_GROUP)
    )
    pending: list[pa.RecordBatch] = []
    for i, name in enumerate(names):
        tmp = folder / (name + ".tmp")
        budget = SHARD_ROWS if i < shards - 1 else None
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            written = 0
            while budget is None or written < budget:
                batch = pending.pop() if pending else next(batches, None)
                if batch is None:
                    break
                if budget is not None and written + batch.num_rows > budget:
                    cut = budget - written
                    pending.append(batch.slice(cut))
                    batch = batch.slice(0, cut)
                writer.write_table(pa.Table.from_batches([batch], schema=schema), row_group_size=_ROW_GROUP)
                written += batch.num_rows
        os.replace(tmp, folder / name)
    return [f"{folder.name}/{n}" for n in names]


def _examples(out_dir: Path, data_files: dict[str, list[str]], n: int = 3) -> list[dict[str, Any]]:
    """Up to n rows for the card: injected first, then clean (other kinds: one row of each)."""
    rows: list[dict[str, Any]] = []
    for path in data_files.get("train", []):
        wanted = ["id", "kind", "prompt", "completion", "injection"]
        names = pq.read_schema(out_dir / path).names
        table = pq.read_table(out_dir / path, columns=[c for c in wanted if c in names])
        for row in table.slice(0, 200).to_pylist():
            if isinstance(row["prompt"], list):  # conversational prompt (prompt sets): as text
                row["prompt"] = "\n".join(f"{m['role']}: {m['content']}" for m in row["prompt"])
            row.setdefault("completion", "")
            rows.append(row)
        if len(rows) >= 200:
            break
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
    chunks: list[Path],
    recipe: Recipe,
    stats: Any,
    funnel: dict[str, Any],
    *,
    usage: dict[str, Any],
    timings: dict[str, float],
    manifest_extra: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
) -> dict[str, dict[str, int]]:
    """Write shards from the finished ``chunks`` (in order), card, recipe and manifest; returns row
    counts per config and split. ``audit``: the card's "Audit" figures (read from the target
    folder by the caller: ``out_dir`` is a staging folder)."""
    from bsafe_data.card import render_card
    from bsafe_data.methods.base import method_class

    method = method_class(recipe)  # its `features` are the shards' columns
    counts: dict[str, dict[str, int]] = {"default": {}, "rejected": {}}
    files: dict[str, dict[str, list[str]]] = {"default": {}, "rejected": {}}
    for split in ("train", "test"):
        rows = stats.kept.get(split, 0)
        # an (allowed) empty build still has a default config, so `load_dataset` never serves another
        if rows or (split == "train" and not sum(stats.kept.values())):
            counts["default"][split] = rows
            files["default"][split] = _write_shards(
                [c / f"{split}.parquet" for c in chunks],
                method.features.arrow_schema,
                out_dir / "data",
                split,
                rows,
            )
    if stats.rejected:
        counts["rejected"]["train"] = stats.rejected
        files["rejected"]["train"] = _write_shards(
            [c / "rejected.parquet" for c in chunks],
            rejected_features(method.features).arrow_schema,
            out_dir / "rejected",
            "train",
            stats.rejected,
        )
    for config, config_features in method_class(recipe).extra_configs.items():  # DPO pairs: CONFIG/…
        per_split = {}
        for split in ("train", "test"):
            sources = [c / f"{config}-{split}.parquet" for c in chunks]
            present = [src for src in sources if src.exists()]
            per_split[split] = (sources, sum(pq.ParquetFile(src).metadata.num_rows for src in present))
        for split, (sources, rows) in per_split.items():
            if rows or (split == "train" and not sum(n for _, n in per_split.values())):
                counts.setdefault(config, {})[split] = rows
                files.setdefault(config, {})[split] = _write_shards(
                    sources, config_features.arrow_schema, out_dir / config, split, rows
                )
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
            "primary": recipe.tokenizers.primary,
            "all": recipe.tokenizers.all,
            "hub_ids": {ref: upstream_tokenizer(ref) for ref in recipe.tokenizers.all},
        },
        **method.manifest_fields(recipe),
        "control_tokens": method.control_vocabulary(recipe, max_x),
        "funnel": funnel,
        "counts": counts,
        "categories": dict(sorted(stats.categories.items())),
        "position_fifths": fifths_histogram(stats.positions),
        "backtrack_max": max_x,
        "usage": usage,
        "timings": timings,
        "complete": not stats.transient,
        "transient_rows": stats.transient,
        **(manifest_extra or {}),
    }
    from bsafe_data.stats import write_score_plots

    plots = method.plots(out_dir, stats) + write_score_plots(out_dir, recipe)
    examples = _examples(out_dir, files["default"])
    _atomic_write_text(out_dir / "recipe.yaml", recipe.to_yaml())
    card = render_card(recipe, manifest, files, examples, plots, stats, audit=audit)
    _atomic_write_text(out_dir / "README.md", card)
    manifest["files"] = file_entries(out_dir)  # last: the manifest describes every other file
    _atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return counts
