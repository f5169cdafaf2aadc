"""What a dataset folder consists of, and whether it still is what its build wrote.

The manifest's ``files`` lists every file of the dataset (all but ``manifest.json`` itself and the
internal ``.bsafe/`` state) with its sha256, size and, for parquet shards, row count. ``verify``
checks the manifest's own shape (every field a command reads, of its type), those files (each a
regular file inside the folder, its bytes, its parquet footer: rows and the columns of its
config), that no undeclared file is present and no link leaves the folder, the recipe, the schema
version and the funnel arithmetic. A folder is data a user may have downloaded: every command that
reads one (``show``, ``stats``, ``refilter``, ``rerender``, ``audit …``, ``push``) calls
``checked`` first and refuses a folder that does not verify (``FolderError``, exit 2), and
``require_outside`` keeps a command's output out of its input folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bsafe_data.executor.output import STATE_DIR
from bsafe_data.rows import SCHEMA_VERSION
from bsafe_data.terminal import safe

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
#: A manifest lists a few dozen files: anything near this is not one.
MAX_MANIFEST_BYTES = 16 * 1000 * 1000
_CHUNK = 1 << 20
#: Problems a refusal names (``verify DIR`` lists them all).
SHOWN_PROBLEMS = 3


class FolderError(Exception):
    """A command refuses a dataset folder: it does not verify, or an output would go inside it.

    The message is one line (the first problems); the CLI prints it and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


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


# -- the manifest's shape: every field verify or a command over the folder reads --------------------
class _Shape(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _FileEntry(_Shape):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    rows: int | None = Field(None, ge=0)


class _Funnel(_Shape):
    source_rows: int = Field(ge=0)
    rows: int = Field(ge=0)
    kept: int = Field(ge=0)
    rejected: int = Field(ge=0)
    rejected_by_reason: dict[str, int]
    reason_hits: dict[str, int] = Field(default_factory=dict)
    kept_by_kind: dict[str, int] = Field(default_factory=dict)
    repaired_boundaries: int = Field(0, ge=0)


class _Tokenizers(_Shape):
    primary: str
    all: list[str]
    hub_ids: dict[str, str] = Field(default_factory=dict)


class _Refiltered(_Shape):
    built_recipe_sha256: str | None = None


class _Manifest(_Shape):
    method: str
    recipe_sha256: str
    package_version: str
    tokenizers: _Tokenizers
    funnel: _Funnel
    counts: dict[str, dict[str, int]]
    files: dict[str, _FileEntry]
    usage: dict[str, Any] = Field(default_factory=dict)
    usage_by_client: dict[str, dict[str, Any]] | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    refilter: _Refiltered | None = None


def _shape_problems(manifest: dict[str, Any]) -> list[str]:
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as exc:
        return [
            f"{MANIFEST}: {'.'.join(str(p) for p in error['loc']) or '<root>'}: "
            + error["msg"].split(" or instance of ")[0]  # not the model's class name
            for error in exc.errors()
        ]
    return []


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
    """Check a dataset folder against its manifest; see the module docstring. Never raises for
    what the folder holds: every finding is a problem (control characters of the names it
    quotes shown as ``\\xNN``: file names are data, printed and never obeyed)."""
    result = _verify(Path(folder))
    result.problems[:] = [safe(problem) for problem in result.problems]
    return result


def _verify(folder: Path) -> Verification:
    result = Verification(folder)
    problems = result.problems
    path = folder / MANIFEST
    if path.is_symlink() or (path.exists() and not path.is_file()):
        problems.append(f"{MANIFEST} is not a regular file")  # a link, a FIFO: never read through
        return result
    if path.is_file() and path.stat().st_size > MAX_MANIFEST_BYTES:
        problems.append(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES:,} bytes")
        return result
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
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
    shape = _shape_problems(manifest)
    if shape:  # fields of the wrong type: nothing below could trust them
        problems.extend(shape)
        return result
    result.files = declared
    leaving = _links_leaving(folder)
    problems.extend(f"{rel} is a link leaving the folder" for rel in leaving)
    present = set(dataset_files(folder)) - set(leaving)  # never read through
    for rel in sorted(present - set(declared)):
        problems.append(f"undeclared file {rel}")
    schemas, schema_problem = _shard_schemas(manifest["method"])
    problems.extend(schema_problem)
    for rel, entry in sorted(declared.items()):
        problems.extend(_file_problems(folder, rel, entry, present, schemas, manifest["method"]))
    problems.extend(_recipe_problems(folder, manifest["method"], declared))
    problems.extend(_funnel_problems(manifest))
    return result


def checked(folder: str | Path) -> Verification:
    """``verify`` ``folder`` before a command reads it: raises ``FolderError`` naming the first
    problems unless the folder is what its build wrote."""
    result = verify(folder)
    if result.ok:
        return result
    shown = "; ".join(result.problems[:SHOWN_PROBLEMS])
    more = len(result.problems) - SHOWN_PROBLEMS
    tail = f" (and {more} more: `bsafe-data verify {folder}` lists them)" if more > 0 else ""
    raise FolderError(f"{folder} does not verify against its manifest: {shown}{tail}", result.problems)


def require_outside(
    folder: str | Path, path: str | Path, option: str, *, state: bool = False, replaces: bool = False
) -> None:
    """Refuse an output ``path`` (named ``option`` on the command line) inside the input
    ``folder``: writing there changes the dataset being read. ``state``: paths inside the
    folder's ``.bsafe/`` state are allowed; ``replaces``: the output replaces ``path`` whole, so a
    ``path`` holding the folder is refused too."""
    source, target = Path(folder).resolve(), Path(path).resolve()
    if state and (target == source / STATE_DIR or (source / STATE_DIR) in target.parents):
        return
    if target == source or source in target.parents:
        raise FolderError(
            f"{option} {path} is inside the dataset folder {folder}: the folder would no longer "
            "verify; choose a path outside it"
        )
    if replaces and target in source.parents:
        raise FolderError(f"{option} {path} holds the dataset folder {folder}: choose a path outside it")


def _safe_relative(rel: str) -> bool:
    """A declared path is plain: relative, normalised, no ``..``, not the manifest or the state."""
    pure = PurePosixPath(rel)
    return (
        bool(rel)
        and "\\" not in rel
        and "\0" not in rel
        and pure.as_posix() == rel
        and not pure.is_absolute()
        and ".." not in pure.parts
        and pure.parts[0] not in (STATE_DIR, MANIFEST)
    )


def _links_leaving(folder: Path) -> list[str]:
    """Links (to files or folders) whose target lies outside the folder, relative paths."""
    root = folder.resolve()
    found = []
    for top, dirs, files in os.walk(folder):  # links to folders are listed, not followed
        here = Path(top)
        if here == folder:
            dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in [*dirs, *files]:
            path = here / name
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(root):
                found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def _shard_schemas(method_name: str) -> tuple[dict[str, Any], list[str]]:
    """The Arrow schema of each config's folder (``data``, ``rejected``, the method's extra
    configs) for the method the manifest names."""
    from bsafe_data.errors import BuildError
    from bsafe_data.registry import method_class
    from bsafe_data.rows import rejected_features

    try:
        method = method_class(method_name)
    except BuildError as exc:
        return {}, [f"{MANIFEST}: {exc}"]
    schemas = {
        "data": method.features.arrow_schema,
        "rejected": rejected_features(method.features).arrow_schema,
    }
    schemas.update({name: features.arrow_schema for name, features in method.extra_configs.items()})
    return schemas, []


def _file_problems(
    folder: Path, rel: str, entry: dict[str, Any], present: set[str], schemas: dict[str, Any], method: str
) -> list[str]:
    """What is wrong with one declared file (empty: nothing)."""
    if not _safe_relative(rel):
        return [f"{MANIFEST} declares {rel!r}: not a plain path inside the folder"]
    path = folder / rel
    if rel not in present:
        return [] if (folder / rel).is_symlink() else [f"missing file {rel}"]  # a link: said above
    if not path.is_file():
        return [f"{rel} is not a regular file"]
    if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
        return [f"{rel} changed since the build (sha256 differs)"]
    if not rel.endswith(".parquet") or not schemas:
        return []
    return _shard_problems(path, rel, entry, schemas, method)


def _shard_problems(
    path: Path, rel: str, entry: dict[str, Any], schemas: dict[str, Any], method: str
) -> list[str]:
    """A parquet shard reads, holds the rows the manifest says and the columns of its config."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = rel.split("/", 1)[0]
    expected = schemas.get(config) if "/" in rel else None
    if expected is None:
        return [f"{rel} is not in a config folder of a {method} dataset ({', '.join(sorted(schemas))})"]
    try:
        metadata = pq.read_metadata(path)
        schema = metadata.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        return [f"{rel} cannot be read as parquet: {exc}"]
    problems = []
    if metadata.num_rows != entry.get("rows"):
        problems.append(f"{rel} holds {metadata.num_rows} rows, {MANIFEST} says {entry.get('rows')}")
    if not schema.equals(expected):
        problems.append(
            f"{rel} does not have the columns of a {method} dataset: {_schema_difference(schema, expected)}"
        )
    return problems


def _schema_difference(schema: Any, expected: Any) -> str:
    missing = [n for n in expected.names if n not in schema.names]
    extra = [n for n in schema.names if n not in expected.names]
    if missing or extra:
        return "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(extra)}" if extra else "",
            )
            if part
        )
    typed = [f.name for f in expected if not schema.field(f.name).equals(f)]
    return f"other types: {', '.join(typed)}" if typed else "the columns in another order"


def _recipe_problems(folder: Path, method: str, declared: dict[str, Any]) -> list[str]:
    """The folder's recipe loads (commands over the folder read it) and names the manifest's method."""
    from bsafe_data.recipe import RecipeError
    from bsafe_data.registry import load_recipe

    if RECIPE not in declared:
        return [f"{MANIFEST} declares no {RECIPE}"]
    if not (folder / RECIPE).is_file():
        return []  # reported with the files
    try:
        recipe = load_recipe(folder / RECIPE)
    except RecipeError as exc:
        return [f"{RECIPE}: {path or '<root>'}: {message}" for path, _, message in exc.problems]
    if recipe.method != method:
        return [f"{RECIPE} is a {recipe.method} recipe, {MANIFEST} says {method}"]
    return []


def _funnel_problems(manifest: dict[str, Any]) -> list[str]:
    """The funnel adds up and the counts are the shards' rows (``manifest`` of the right shape)."""
    funnel, counts, files = manifest["funnel"], manifest["counts"], manifest["files"]
    problems = []
    kept, rejected = funnel["kept"], funnel["rejected"]
    if funnel["rows"] != kept + rejected:
        problems.append(f"funnel: rows {funnel['rows']} != kept {kept} + rejected {rejected}")
    if sum(funnel["rejected_by_reason"].values()) != rejected:
        problems.append("funnel: rejected_by_reason does not add up to rejected")
    folders = {"default": "data"}
    for config, splits in counts.items():
        for split, n in splits.items():
            prefix = f"{folders.get(config, config)}/{split}-"
            rows = sum(e.get("rows") or 0 for rel, e in files.items() if rel.startswith(prefix))
            if rows != n:
                problems.append(f"counts: {config}/{split} says {n} rows, its shards hold {rows}")
    if sum((counts.get("default") or {}).values()) != kept:
        problems.append("counts: default rows do not equal the funnel's kept")
    return problems
