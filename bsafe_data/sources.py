"""Read chat corpora into conversations: local JSONL/JSON/Parquet/CSV files or Hugging Face datasets.

Every source row becomes either a ``Conversation`` or a ``SourceReject`` with a stable reason code;
a bad row never stops the run. Rows stream, so memory does not grow with the corpus.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from bsafe_data.recipe import FieldMapping, SourceSpec

BUNDLED_CORPORA = Path(__file__).parent / "data" / "corpus"
_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "developer": "system",
    "bing": "assistant",
    "ai": "assistant",
    "chatbot": "assistant",
    "human_turn": "user",
    "prompter": "user",
}
# OpenAI {role, content} and ShareGPT {from, value} turns are mixed up in the wild.
_OTHER_KEYS = {"role": ("from", "value"), "from": ("role", "content")}
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


class SourceError(Exception):
    """A whole source cannot be read (missing file, unknown format, dataset not available)."""


@dataclass(frozen=True)
class SourceRef:
    """Where a row came from; recorded in the ``source`` column."""

    dataset: str
    split: str
    index: int
    id: str
    revision: str

    def as_dict(self) -> dict[str, Any]:
        """The ``source`` struct of the row contract."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "index": self.index,
            "id": self.id,
            "revision": self.revision,
        }


@dataclass(frozen=True)
class Conversation:
    """A usable source row: the turns before the answer, and the answer to modify."""

    ref: SourceRef
    context: tuple[tuple[str, str], ...]
    response: str


@dataclass(frozen=True)
class SourceReject:
    """A source row that cannot be used, with what could be read of it."""

    ref: SourceRef
    reason: str
    detail: str
    context: tuple[tuple[str, str], ...] = ()
    response: str = ""


SourceItem = Conversation | SourceReject


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def resolve_path(path: str) -> Path:
    """Resolve ``builtin:NAME`` to the bundled corpus; other paths as given."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        found = BUNDLED_CORPORA / f"{name}.jsonl"
        if not found.is_file():
            have = sorted(p.stem for p in BUNDLED_CORPORA.glob("*.jsonl"))
            raise SourceError(f"unknown bundled corpus {name!r}; have {have}")
        return found
    return Path(path)


def detect_format(path: Path) -> str:
    """Format from the file suffix (``.jsonl``/``.json``/``.parquet``/``.csv``)."""
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(f"{path}: cannot tell the format from the suffix; set `format:`")
    return fmt


@dataclass(frozen=True)
class SourceIdentity:
    """What a source is, whatever path it was read from: ``dataset`` (its ``name``, else
    ``sha256:`` + 16 hex digits of a file's digest, else the Hugging Face id) and ``revision`` (a
    file's full ``sha256:`` digest; the commit a Hugging Face dataset resolves to, when known)."""

    dataset: str
    revision: str


def file_digest(path: Path) -> str:
    """``sha256:`` and the hex digest of a file's bytes (cached while the file is unchanged)."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def file_identity(location: str, name: str | None = None) -> SourceIdentity:
    """A local file's identity: ``name``, else a bundled file's ``builtin:NAME``, else ``sha256:``
    and the first 16 hex digits of its digest; the revision is the whole digest. SourceError when
    the file cannot be read."""
    path = resolve_path(location)
    try:
        digest = file_digest(path)
    except OSError as exc:
        problem = f"source file not found: {path}" if not path.is_file() else f"{path}: {exc.strerror or exc}"
        raise SourceError(problem) from None
    label = location if location.startswith("builtin:") else digest[: len("sha256:") + 16]
    return SourceIdentity(name or label, digest)


def source_identity(spec: SourceSpec) -> SourceIdentity:
    """The source's identity (see ``SourceIdentity``); SourceError when a file cannot be read."""
    if spec.hf is not None:
        return SourceIdentity(spec.name or spec.hf, _hf_revision(spec))
    return file_identity(spec.path or "", spec.name)


def source_identities(specs: Sequence[SourceSpec]) -> list[SourceIdentity]:
    """Every source's identity, in recipe order; SourceError when two sources are the same one
    (same name, or same content without a name): their rows would be the same rows."""
    found = [source_identity(spec) for spec in specs]
    seen: dict[str, int] = {}
    for i, identity in enumerate(found):
        if identity.dataset in seen:
            raise SourceError(
                f"sources {seen[identity.dataset] + 1} and {i + 1} are the same source "
                f"({identity.dataset}): give them different `name`s, or drop one"
            )
        seen[identity.dataset] = i
    return found


def published_sources(specs: Sequence[SourceSpec]) -> list[SourceSpec]:
    """The sources as a published recipe gives them: each named by its identity (so rows and
    recipe agree wherever the files are), absolute paths cut to the file's name (no builder's
    directory in a published folder)."""
    out = []
    for spec in specs:
        update: dict[str, Any] = {}
        if spec.name is None:
            update["name"] = source_identity(spec).dataset
        if spec.path is not None and Path(spec.path).is_absolute():
            update["path"] = Path(spec.path).name
        out.append(spec.model_copy(update=update))
    return out


def _hf_revision(spec: SourceSpec) -> str:
    """The commit a Hugging Face dataset resolves to: a pinned commit as is; else asked of the Hub,
    or, offline, the commit the local Hub cache holds for it; else the pinned name (or "")."""
    from huggingface_hub import HfApi, constants

    wanted = spec.revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", wanted):
        return wanted
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().dataset_info(spec.hf or "", revision=spec.revision, timeout=10).sha or ""
        except Exception:  # no network, no such revision: the read itself says what is wrong
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{(spec.hf or '').replace('/', '--')}" / "refs" / wanted
    try:
        return ref.read_text().strip()
    except OSError:
        return spec.revision or ""


def spec_from_cli(value: str) -> SourceSpec:
    """A SourceSpec for ``--source``: an existing path or ``builtin:``, else a Hub dataset id."""
    if value.startswith("builtin:") or Path(value).exists():
        return SourceSpec(path=value)
    if "/" in value and not value.startswith((".", "/")):
        return SourceSpec(hf=value)
    raise SourceError(f"--source {value!r}: no such file, and not a Hugging Face dataset id (org/name)")


def _text(value: Any, field: str) -> str:
    if value is None:
        raise _Reject("missing_field", f"`{field}` is missing")
    if not isinstance(value, str):
        raise _Reject("wrong_type", f"`{field}` is {type(value).__name__}, expected text")
    return value


def _turns_from_messages(raw: Any, field: str, role_key: str, content_key: str) -> list[tuple[str, str]]:
    if raw is None:
        raise _Reject("missing_field", f"`{field}` is missing")
    if isinstance(raw, str):  # CSV cells hold JSON text
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise _Reject("wrong_type", f"`{field}` is text that is not a JSON list") from None
    if not isinstance(raw, list):
        raise _Reject("wrong_type", f"`{field}` is {type(raw).__name__}, expected a list of turns")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, Mapping):
            raise _Reject("wrong_type", f"`{field}[{i}]` is not an object")
        if role_key not in turn and content_key not in turn:  # the other shape's keys
            role_key, content_key = _OTHER_KEYS.get(role_key, (role_key, content_key))
        role = _ROLE_ALIASES.get(str(turn.get(role_key, "")).strip().lower())
        if role is None:
            raise _Reject("wrong_type", f"`{field}[{i}].{role_key}` is {turn.get(role_key)!r}")
        turns.append((role, _content(turn.get(content_key), f"{field}[{i}].{content_key}")))
    return turns


def _content(value: Any, field: str) -> str:
    """A message's text: a string, or OpenAI content parts (``[{type: text, text: ...}]``)."""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text", "output_text"):
                if not isinstance(part.get("text"), str):
                    raise _Reject("wrong_type", f"`{field}[{j}].text` is not text")
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise _Reject("wrong_type", f"`{field}[{j}]` is a {kind!r} part; only text is supported")
        return "".join(texts)
    return _text(value, field)


def _split_last_answer(turns: list[tuple[str, str]]) -> tuple[tuple[tuple[str, str], ...], str]:
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise _Reject("no_assistant_turn", "the conversation has no assistant turn")
    if last == 0 or all(role == "system" for role, _ in turns[:last]):
        raise _Reject("missing_field", "no user turn before the assistant answer")
    return tuple(turns[:last]), turns[last][1]


def conversation_from_record(record: Mapping[str, Any], mapping: FieldMapping) -> tuple[tuple, str]:
    """(context, response) from one record, using ``mapping`` or the common shapes. Raises _Reject."""
    if not isinstance(record, Mapping):
        raise _Reject("wrong_type", f"row is {type(record).__name__}, expected an object")
    system = []
    if mapping.system and record.get(mapping.system):  # optional: null/empty cells add no turn
        system = [("system", _text(record[mapping.system], mapping.system))]

    def has(name: str | None) -> bool:
        # null cells do not count: mixed-shape parquet/HF datasets fill absent columns with null
        return name is not None and record.get(name) is not None

    messages = mapping.messages or "messages"
    conversations = mapping.conversations or "conversations"
    if has(messages):
        turns = _turns_from_messages(record[messages], messages, "role", "content")
        return _split_last_answer(system + turns)
    if has(conversations):
        turns = _turns_from_messages(record[conversations], conversations, "from", "value")
        return _split_last_answer(system + turns)
    prompt_key = mapping.prompt or "prompt"
    response_key = mapping.response or "response"
    if prompt_key in record or response_key in record:
        prompt = _text(record.get(prompt_key), prompt_key)
        response = _text(record.get(response_key), response_key)
        return tuple(system + [("user", prompt)]), response
    instruction_key = mapping.instruction or "instruction"
    output_key = mapping.output or "output"
    if instruction_key in record or output_key in record:
        instruction = _text(record.get(instruction_key), instruction_key)
        extra = record.get(mapping.input or "input")
        if extra is not None and not isinstance(extra, str):
            raise _Reject("wrong_type", f"`{mapping.input or 'input'}` is {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return tuple(system + [("user", prompt)]), _text(record.get(output_key), output_key)
    raise _Reject(
        "missing_field",
        "no known fields (messages, conversations, prompt/response, instruction/output); set `mapping:`",
    )


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def sniff_encoding(path: Path, declared: str | None) -> str:
    """The declared encoding, else the one a byte-order mark names, else UTF-8."""
    if declared:
        return declared
    with path.open("rb") as handle:
        head = handle.read(4)
    return next((name for bom, name in _BOMS if head.startswith(bom)), "utf-8")


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str | _Reject]]:
    """(line number, text) of a text file; a line that does not decode is a reject, not a stop."""
    if encoding in ("utf-8", "utf8"):  # per line: one bad line must not hide the others
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    detail = (
                        f"line {number} is not valid UTF-8 (byte {exc.start}); "
                        "set `encoding:` if the file uses another"
                    )
                    yield number, _Reject("wrong_type", detail)
        return
    try:
        with path.open("r", encoding=encoding, newline="") as handle:
            yield from enumerate(handle, 1)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not valid {encoding} ({exc.reason} at byte {exc.start})") from None
    except LookupError:
        raise SourceError(f"{path}: unknown encoding {encoding!r}") from None


def _records_jsonl(path: Path, encoding: str) -> Iterator[Any]:
    for number, line in _lines(path, encoding):
        if isinstance(line, _Reject):
            yield line
            continue
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            yield _Reject("wrong_type", f"line {number}: invalid JSON ({exc.msg})")


def _records_json(path: Path, encoding: str) -> Iterator[Any]:
    try:
        with path.open("r", encoding=encoding) as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: not a readable JSON file: {exc}") from None
    except LookupError:
        raise SourceError(f"{path}: unknown encoding {encoding!r}") from None
    if isinstance(data, Mapping):  # {"data": [...]} or {"rows": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise SourceError(f"{path}: expected a JSON list of rows (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of rows")
    yield from data


def _records_parquet(path: Path, encoding: str) -> Iterator[Any]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise SourceError(f"{path}: not a readable parquet file: {exc}") from None
    for batch in parquet.iter_batches(batch_size=2048):
        yield from batch.to_pylist()


def _records_csv(path: Path, encoding: str) -> Iterator[Any]:
    try:
        with path.open("r", encoding="utf-8-sig" if encoding == "utf-8" else encoding, newline="") as handle:
            yield from csv.DictReader(handle)
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{path}: not valid {encoding} ({exc.reason} at byte {exc.start}); "
            "set `encoding:` for this source"
        ) from None
    except LookupError:
        raise SourceError(f"{path}: unknown encoding {encoding!r}") from None


def _records_hf(spec: SourceSpec) -> Iterator[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(
            spec.hf, name=spec.config, split=spec.split, revision=spec.revision, streaming=spec.streaming
        )
    except Exception as exc:  # datasets raises many types; the message is what users need
        raise SourceError(f"cannot open Hugging Face dataset {spec.hf!r}: {exc}") from None
    yield from ds


def _raw_records(spec: SourceSpec) -> Iterator[Any]:
    if spec.hf is not None:
        return _records_hf(spec)
    path = resolve_path(spec.path or "")
    if not path.is_file():
        raise SourceError(f"source file not found: {path}")
    fmt = detect_format(path) if spec.format == "auto" else spec.format
    reader = {
        "jsonl": _records_jsonl,
        "json": _records_json,
        "parquet": _records_parquet,
        "csv": _records_csv,
    }
    return reader[fmt](path, sniff_encoding(path, spec.encoding))


def raw_records(spec: SourceSpec) -> Iterator[Mapping[str, Any]]:
    """The rows of a local source as its reader yields them (dicts), up to ``spec.limit``; rows
    that cannot be read (invalid JSON, bad bytes, not an object) are skipped. ``SourceError`` for a
    missing or unreadable file."""
    kept = 0
    for record in _raw_records(spec):
        if spec.limit is not None and kept >= spec.limit:
            return
        if isinstance(record, Mapping):
            kept += 1
            yield record


#: A source whose first rows are all unusable is refused (say what was found) instead of turning
#: every row into a reject.
PROBE_ROWS = 50


def read_source(spec: SourceSpec, identity: SourceIdentity | None = None) -> Iterator[SourceItem]:
    """Stream one source as Conversations and SourceRejects, in file order; their ``ref`` carries
    the source's identity (computed here unless given).

    Raises SourceError when none of the first ``PROBE_ROWS`` rows can be used (wrong mapping,
    wrong encoding, not a chat corpus), naming what was found.
    """
    usable = False
    probe: list[SourceItem] = []
    for item in _read_source(spec, identity or source_identity(spec)):
        if usable:
            yield item
            continue
        probe.append(item)
        if isinstance(item, Conversation):
            usable = True
        elif len(probe) >= PROBE_ROWS:
            break
        if usable:
            yield from probe
            probe = []
    if not usable and len(probe) >= PROBE_ROWS:  # smaller sources end as "0 rows kept" instead
        reasons = Counter(i.reason for i in probe)
        if not set(reasons) <= {"missing_field", "wrong_type", "no_assistant_turn"}:
            yield from probe  # e.g. empty answers or lines too short: rows, not a shape problem
            return
        first = probe[0]
        raise SourceError(
            f"source {spec.location!r}: none of the first {len(probe)} rows is usable "
            f"({', '.join(f'{r} {n}' for r, n in reasons.most_common())}); first row: {first.detail}"
            f"{_found_keys(spec)}"
        )
    yield from probe


def _found_keys(spec: SourceSpec) -> str:
    """ ", found columns [...]" from the first record, to say what a mapping must name."""
    try:
        first = next(iter(_raw_records(spec)), None)
    except SourceError:
        return ""
    if isinstance(first, Mapping):
        return f"; found columns {sorted(map(str, first))[:12]}; set `mapping:`"
    return ""


def _read_source(spec: SourceSpec, identity: SourceIdentity) -> Iterator[SourceItem]:
    dataset, revision = identity.dataset, identity.revision
    for index, record in enumerate(_raw_records(spec)):
        if spec.limit is not None and index >= spec.limit:
            return
        row_id = str(index)
        if isinstance(record, Mapping) and spec.mapping.id and record.get(spec.mapping.id) is not None:
            row_id = str(record[spec.mapping.id])
        elif isinstance(record, Mapping) and record.get("id") is not None:
            row_id = str(record["id"])
        ref = SourceRef(dataset, spec.split, index, row_id, revision)
        try:
            if isinstance(record, _Reject):
                raise record
            context, response = conversation_from_record(record, spec.mapping)
            if not response.strip():
                raise _Reject("empty_response", "the answer is empty")
        except _Reject as rej:
            yield SourceReject(ref, rej.reason, rej.detail)
            continue
        yield Conversation(ref, context, response)


def read_sources(specs: list[SourceSpec], limit: int | None = None) -> Iterator[SourceItem]:
    """All sources in recipe order, stopping after ``limit`` rows in total."""
    count = 0
    for spec, identity in zip(specs, source_identities(specs), strict=True):
        for item in read_source(spec, identity):
            if limit is not None and count >= limit:
                return
            count += 1
            yield item


def count_source_rows(specs: list[SourceSpec], limit: int | None = None) -> int | None:
    """How many source rows ``read_sources`` will yield, when that is cheap to know (JSONL lines,
    CSV records, parquet metadata); None otherwise (JSON files, Hugging Face streams)."""
    total = 0
    for spec in specs:
        try:
            rows = _count_rows(spec)
        except (OSError, SourceError, ValueError, csv.Error):
            return None
        if rows is None:
            return None
        total += rows if spec.limit is None else min(rows, spec.limit)
    return total if limit is None else min(total, limit)


def _count_rows(spec: SourceSpec) -> int | None:
    if spec.hf is not None:
        return None
    path = resolve_path(spec.path or "")
    fmt = detect_format(path) if spec.format == "auto" else spec.format
    if fmt == "jsonl":
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if fmt == "csv":
        return sum(1 for _ in _records_csv(path, sniff_encoding(path, spec.encoding)))
    return None
