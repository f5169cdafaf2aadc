"""What a dataset folder consists of, and whether it still is what its build wrote.

The manifest's ``files`` lists every file of the dataset (all but ``manifest.json`` itself and the
internal ``.bsafe/`` state) with its sha256, size and, for parquet shards, row count. ``verify``
checks those, that no undeclared file is present, the schema version and the funnel arithmetic;
``push`` publishes only a folder that verifies, and exactly its declared files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bsafe_data.executor.output import STATE_DIR
from bsafe_data.rows import SCHEMA_VERSION

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def dataset_files(folder: Path) -> list[str]:
    """Relative paths of every file in the folder that belongs to the dataset (sorted)."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() or rel == MANIFEST or rel.split("/", 1)[0] == STATE_DIR:
            continue
        out.append(rel)
    return sorted(out)


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """``{path: {sha256, bytes[, rows]}}`` for every dataset file: the manifest's ``files``."""
    entries: dict[str, dict[str, Any]] = {}
    for rel in dataset_files(folder):
        path = folder / rel
        entry: dict[str, Any] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
        if rel.endswith(".parquet"):
            entry["rows"] = _parquet_rows(path)
        entries[rel] = entry
    return entries


@dataclass
class Verification:
    """The outcome of ``verify``: problems (empty = the folder is what its build wrote)."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def verify(folder: str | Path) -> Verification:
    """Check a dataset folder against its manifest (hashes, files, schema version, funnel)."""
    folder = Path(folder)
    result = Verification(folder)
    problems = result.problems
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{folder} is not a bsafe-data dataset: {MANIFEST} is missing")
        return result
    except (OSError, ValueError) as exc:
        problems.append(f"{MANIFEST} cannot be read: {exc}")
        return result
    if not isinstance(manifest, dict) or manifest.get("package") != "bsafe-data":
        problems.append(f"{MANIFEST} was not written by bsafe-data")
        return result
    if manifest.get("schema_version") != SCHEMA_VERSION:
        problems.append(
            f"schema version {manifest.get('schema_version')!r}, this bsafe-data writes {SCHEMA_VERSION!r}: "
            "rebuild (cached answers cost nothing) or use the matching bsafe-data version"
        )
    declared = manifest.get("files")
    if not isinstance(declared, dict) or not declared:
        problems.append(f"{MANIFEST} lists no files (built by an older bsafe-data?): rebuild the folder")
        return result
    result.files = declared
    present = set(dataset_files(folder))
    for rel in sorted(present - set(declared)):
        problems.append(f"undeclared file {rel}")
    for rel, entry in sorted(declared.items()):
        path = folder / rel
        if rel not in present:
            problems.append(f"missing file {rel}")
            continue
        if path.stat().st_size != entry.get("bytes") or sha256_of(path) != entry.get("sha256"):
            problems.append(f"{rel} changed since the build (sha256 differs)")
    problems.extend(_funnel_problems(manifest))
    return result


def _funnel_problems(manifest: dict[str, Any]) -> list[str]:
    funnel, counts, files = manifest.get("funnel") or {}, manifest.get("counts") or {}, manifest["files"]
    problems = []
    kept, rejected = funnel.get("kept", -1), funnel.get("rejected", -1)
    if funnel.get("rows") != kept + rejected:
        problems.append(f"funnel: rows {funnel.get('rows')} != kept {kept} + rejected {rejected}")
    if sum((funnel.get("rejected_by_reason") or {}).values()) != rejected:
        problems.append("funnel: rejected_by_reason does not add up to rejected")
    folders = {"default": "data"}
    for config, splits in counts.items():
        for split, n in splits.items():
            prefix = f"{folders.get(config, config)}/{split}-"
            rows = sum(e.get("rows", 0) for rel, e in files.items() if rel.startswith(prefix))
            if rows != n:
                problems.append(f"counts: {config}/{split} says {n} rows, its shards hold {rows}")
    if sum((counts.get("default") or {}).values()) != kept:
        problems.append("counts: default rows do not equal the funnel's kept")
    return problems
