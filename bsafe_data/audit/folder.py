"""Read what the audit needs from a built dataset folder: rows, manifest hash, thresholds."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

#: Sub-folder of a dataset folder for bsafe's internal state; never published.
STATE_DIR = ".bsafe"
DB_NAME = "audit.sqlite"

#: Config name -> sub-folder holding its parquet shards.
CONFIG_DIRS = {"default": "data", "rejected": "rejected"}


def default_db_path(folder: str | Path) -> Path:
    """Where the audit store of a dataset folder lives: ``DIR/.bsafe/audit.sqlite``."""
    return Path(folder) / STATE_DIR / DB_NAME


def manifest_sha256(folder: str | Path) -> str:
    """sha256 of the folder's ``manifest.json`` bytes (identifies the dataset version judged)."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {folder} a built dataset folder?")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def iter_rows(folder: str | Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every row of both configs as ``(config, split, row)``, shards in name order."""
    import pyarrow.parquet as pq

    for config, sub in CONFIG_DIRS.items():
        for path in sorted((Path(folder) / sub).glob("*.parquet")):
            split = path.name.split("-", 1)[0]
            for row in pq.read_table(path).to_pylist():
                yield config, split, row


def kept_row_ids(folder: str | Path) -> set[str]:
    """Ids of the rows currently in config ``default`` (the kept rows), read from the id column only."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for path in sorted((Path(folder) / CONFIG_DIRS["default"]).glob("*.parquet")):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def classifier_thresholds(folder: str | Path) -> dict[str, float]:
    """``filters.classifiers[].name -> threshold`` from the folder's resolved ``recipe.yaml``."""
    path = Path(folder) / "recipe.yaml"
    if not path.exists():
        return {}
    recipe = yaml.safe_load(path.read_text()) or {}
    out: dict[str, float] = {}
    for spec in (recipe.get("filters") or {}).get("classifiers") or []:
        name, threshold = spec.get("name") or spec.get("provider"), spec.get("threshold")
        if name and threshold is not None:
            out[str(name)] = float(threshold)
    return out


def fifth_of(row: dict[str, Any]) -> int | None:
    """Which fifth (1..5) of the answer the injection sits in; None for clean rows."""
    inj = row.get("injection")
    if not inj or inj.get("relative_position") is None:
        return None
    return min(5, int(float(inj["relative_position"]) * 5) + 1)


def threshold_margin(row: dict[str, Any], thresholds: dict[str, float]) -> float | None:
    """Smallest ``|score - threshold|`` over the row's recorded scores (None without any)."""
    margins = [
        abs(float(s["score"]) - thresholds[s["classifier"]])
        for s in row.get("scores") or []
        if s.get("classifier") in thresholds and s.get("score") is not None and s.get("label") != "error"
    ]
    return min(margins) if margins else None
