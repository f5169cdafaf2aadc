"""Fixtures for the publish tests: a small `bsafe-data build`-style dataset folder, and a subprocess driver.

``build_dataset_folder(path, rows)`` writes README.md (Hub YAML with ``default`` and ``rejected`` configs
and an empty changelog block), ``data/*.parquet``, ``rejected/*.parquet``, recipe.yaml, manifest.json
and a plot, like the builder does.

Run as a script, this module is the test driver that runs inside a subprocess (so ``HF_ENDPOINT`` and
friends are read by a fresh ``huggingface_hub``)::

    python tests/publish_fixtures.py push '{"folder": ..., "repo_id": ..., "version": "1.0.0", ...}'
    python tests/publish_fixtures.py load '{"repo_id": ..., "revisions": ["v1.0.0"], "configs": [...]}'

Both print one JSON line prefixed with ``RESULT `` on stdout; a push error prints
``{"error": message, "exit_code": n}`` instead and exits 3.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

CHANGELOG_BLOCK = "<!-- changelog:start -->\n<!-- changelog:end -->\n"
# 1x1 transparent PNG
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002"
    "00000105a3d0d6a40000000049454e44ae426082"
)


def make_rows(n: int, *, tag: str = "a", start: int = 0, rejected: bool = False) -> list[dict[str, Any]]:
    """``n`` small clean rows of the row contract (``rejected``: with ``reasons`` and ``detail``)."""
    rows = []
    for i in range(start, start + n):
        text = f"row {i} of batch {tag}."
        row: dict[str, Any] = {
            "id": f"{tag}-{i}",
            "source": {"dataset": "corpus", "split": "train", "index": i, "id": f"{tag}-{i}", "revision": ""},
            "context": [{"role": "user", "content": f"question {i}?"}],
            "response": text,
            "kind": "clean",
            "injection": None,
            "segments": [{"kind": "continuation", "text": text, "loss": True}],
            "backtrack": [],
            "prompt": f"User: question {i}?\nAssistant:\n",
            "completion": text,
            "scores": [{"classifier": "builtin", "target": "response", "label": "safe", "score": 0.25,
                        "categories": [tag, str(i % 3)]}],
            "generator": None,
        }  # fmt: skip
        if rejected:
            row.update(reasons=["violation_not_flagged"], detail="")
        rows.append(row)
    return rows


def default_rows(tag: str = "a") -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Rows per config and split, as the builder would write them."""
    return {
        "default": {"train": make_rows(8, tag=tag), "test": make_rows(3, tag=tag, start=100)},
        "rejected": {"train": make_rows(4, tag=f"{tag}-rej", rejected=True)},
    }


def card_text(
    rows: dict[str, dict[str, list[dict[str, Any]]]],
    *,
    pretty_name: str = "Test safety set",
    changelog: str = CHANGELOG_BLOCK,
) -> str:
    """The README.md the builder writes: YAML header, markdown, an (empty) changelog block."""
    from bsafe_data.card import hub_configs

    configs = hub_configs(rows)  # the same configs block the builder writes
    meta = {
        "license": "cc-by-4.0",
        "language": ["en"],
        "pretty_name": pretty_name,
        "task_categories": ["text-generation"],
        "size_categories": ["n<1K"],
        "tags": ["safety", "synthetic", "bsafe-data"],
        "configs": configs,
    }
    header = yaml.safe_dump(meta, sort_keys=False)
    return (
        f"---\n{header}---\n\n# {pretty_name}\n\nA tiny dataset for the publish tests.\n\n"
        f"## Changelog\n\n{changelog}"
    )


#: The recipe.yaml of the folder (a valid recipe: ``verify`` loads it).
RECIPE_TEXT = "name: test\nversion: 1.0.0\nseed: 0\nsources: [{path: corpus.jsonl}]\n"


def build_dataset_folder(
    path: Path,
    rows: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
    *,
    recipe_text: str = RECIPE_TEXT,
    shards: int = 1,
) -> Path:
    """Write a dataset folder like `bsafe-data build` does (the flagship method's columns, a
    manifest that ``verify`` accepts); returns ``path``."""
    from datasets import Dataset

    from bsafe_data.integrity import file_entries
    from bsafe_data.rows import ROW_FEATURES, SCHEMA_VERSION, rejected_features

    rows = rows if rows is not None else default_rows()
    path.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for name, splits in rows.items():
        folder = path / ("data" if name == "default" else name)
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.parquet"):
            old.unlink()
        counts[name] = {}
        for split, split_rows in splits.items():
            counts[name][split] = len(split_rows)
            chunks = [split_rows[i::shards] for i in range(shards)]
            for i, chunk in enumerate(chunks):
                columns = {key: [r[key] for r in chunk] for key in chunk[0]} if chunk else {}
                filename = f"{split}-{i:05d}-of-{shards:05d}.parquet"
                features = ROW_FEATURES if name == "default" else rejected_features(ROW_FEATURES)
                Dataset.from_dict(columns, features=features).to_parquet(str(folder / filename))
    (path / "recipe.yaml").write_text(recipe_text)
    (path / "plots").mkdir(exist_ok=True)
    (path / "plots" / "positions.png").write_bytes(PNG)
    (path / "README.md").write_text(card_text(rows))
    kept = sum(counts.get("default", {}).values())
    rejected = sum(n for name, splits in counts.items() if name != "default" for n in splits.values())
    manifest = {  # what the writer records, so that `verify` (run by push) accepts the folder
        "package": "bsafe-data",
        "schema_version": SCHEMA_VERSION,
        "recipe_sha256": hashlib.sha256(recipe_text.encode()).hexdigest(),
        "package_version": "0.1.0",
        "method": "bsafe_plus",
        "seed": 0,
        "tokenizers": {"primary": "builtin:qwen2.5", "all": ["builtin:qwen2.5"]},
        "funnel": {
            "source_rows": kept + rejected,
            "rows": kept + rejected,
            "kept": kept,
            "rejected": rejected,
            "rejected_by_reason": {"violation_not_flagged": rejected} if rejected else {},
        },
        "counts": counts,
        "files": file_entries(path),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Subprocess driver
# ------------------------------------------------------------------------------------------------
def _push(args: dict[str, Any]) -> dict[str, Any]:
    from bsafe_data.publish import PublishError, push_dataset

    try:
        result = push_dataset(args.pop("folder"), args.pop("repo_id"), args.pop("version"), **args)
    except PublishError as exc:
        return {"error": str(exc), "exit_code": exc.exit_code}
    return {
        "commit_sha": result.commit_sha,
        "parent_sha": result.parent_sha,
        "tag": result.tag,
        "pr_url": result.pr_url,
        "files": result.files,
        "deleted": result.deleted,
        "card_diff": result.card_diff,
        "attempts": result.attempts,
        "repo_id": result.repo_id,
    }


def _load(args: dict[str, Any]) -> dict[str, Any]:
    from datasets import load_dataset

    out: dict[str, Any] = {}
    for revision in args["revisions"]:
        out[revision] = {}
        for config in args["configs"]:
            ds = load_dataset(args["repo_id"], config, revision=revision)
            out[revision][config] = {split: ds[split].to_list() for split in ds}
    return out


if __name__ == "__main__":
    command, payload = sys.argv[1], json.loads(sys.argv[2])
    result = _push(payload) if command == "push" else _load(payload)
    print("RESULT " + json.dumps(result))
    sys.exit(3 if "error" in result else 0)
