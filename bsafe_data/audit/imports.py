"""Judgements exported by Argilla or Label Studio, read back into the audit store.

Files are data: every file is parsed whole before anything is stored (a file that is not JSON, or
not a list of records, is one ``ImportFileError`` naming it and nothing is imported), and every
record is checked on its own. What each record became is counted (:class:`ImportCounts`):

* ``imported`` / ``unchanged``: valid judgements, new or already stored (an import is idempotent);
* ``unmatched``: judgements of rows that are not in this audit set;
* ``invalid``: records or judgements that cannot be used (wrong types, an answer that is not yes /
  no / unsure, no answer at all, text that is not valid Unicode); the first few say why;
* ``not_submitted``: Argilla drafts and discarded responses, Label Studio drafts: not judgements;
* ``unknown_answers``: answers to questions their row does not have (other projects' questions, or
  another group's): not imported.

**Argilla.** Flat exports (``records.to_list(flatten=True)``) carry each response's status: only
``submitted`` ones are judgements. Nested exports (``Dataset.to_disk``, ``records.to_json``) carry
none, so a user's responses to a record count as a judgement when (1) they answer every question
of the row (Argilla refuses to submit a response that leaves a required question open, so a partial
one is a draft or was discarded) and (2) the record is not ``pending``: our exports set the
distribution's ``min_submitted`` to the row's annotators, so a pending record has fewer submitted
responses than that, and on a one-annotator row none. A complete draft on a completed record cannot
be told from a submitted response there; the flat export is exact.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bsafe_data.audit.export import item_key
from bsafe_data.audit.folder import manifest_sha256
from bsafe_data.audit.questions import QUESTIONS, validate_answers
from bsafe_data.audit.store import AuditStore, is_text

#: Files our exports write for the tools to import: never annotations, skipped in a folder.
EXPORT_INPUTS = frozenset({"tasks.json", "project.json", "settings.json", "dataset.json"})
_ALL_QUESTIONS = frozenset(key for qs in QUESTIONS.values() for key, _ in qs)
_PROBLEMS_KEPT = 5


class ImportFileError(ValueError):
    """A file that cannot be read as an export at all (its one-line message names it)."""


@dataclass
class ImportCounts:
    """What the records of an import became (module docstring)."""

    imported: int = 0
    unchanged: int = 0
    unmatched: int = 0
    invalid: int = 0
    not_submitted: int = 0
    unknown_answers: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> int:
        """Judgements that are in the store now (new or already there)."""
        return self.imported + self.unchanged

    def reject(self, where: str, why: str) -> None:
        """Count an invalid record or judgement and keep the first few reasons."""
        self.invalid += 1
        if len(self.problems) < _PROBLEMS_KEPT:
            self.problems.append(f"{where}: {why}")

    def summary(self) -> str:
        """One line: every count."""
        return (
            f"imported {self.imported} judgements ({self.unchanged} unchanged, {self.unmatched} not in this "
            f"audit set, {self.invalid} invalid, {self.not_submitted} not submitted, {self.unknown_answers} "
            "answers to no question of their row)"
        )


@dataclass
class _Candidate:
    """One annotator's answers to one record, before it is matched and checked."""

    where: str
    key: Any
    annotator: Any
    answers: dict[str, Any]
    source: str
    note: Any = ""
    created_at: Any = None
    skipped: bool = False
    submitted: bool | None = True  # None: the export does not say (Argilla nested)
    record_status: Any = None


# -- reading files ---------------------------------------------------------------------------


def _files(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The file itself, or the files of the first pattern that matches any under the folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder {path}")
    for pattern in patterns:
        found = [
            p
            for p in sorted(path.rglob(pattern))
            if p.is_file() and ".argilla" not in p.relative_to(path).parts and p.name not in EXPORT_INPUTS
        ]
        if found:
            return found
    raise FileNotFoundError(f"no {' or '.join(patterns)} export under {path}")


def _parse(file: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` for every record of a JSON list, a JSON object or JSON lines."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{file} is not UTF-8 text (byte {exc.start})") from None
    try:
        if file.suffix == ".jsonl":
            return [
                (f"{file.name} line {n}", json.loads(line))
                for n, line in enumerate(text.splitlines(), 1)
                if line.strip()
            ]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportFileError(
            f"{file} is not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise ImportFileError(f"{file} is nested too deeply to be an export") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ImportFileError(f"{file} holds {type(data).__name__}, not a list of records")
    return [(f"{file.name} record {n}", record) for n, record in enumerate(data, 1)]


def _records(path: Path, *patterns: str) -> list[tuple[str, Any]]:
    """Every record of every file, parsed before anything is imported."""
    return [record for file in _files(path, patterns) for record in _parse(file)]


# -- Argilla ---------------------------------------------------------------------------------


def _argilla_candidates(where: str, record: dict[str, Any], counts: ImportCounts) -> Iterator[_Candidate]:
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    key = record.get("id") or metadata.get("item_key") or record.get("item_key")
    answers: dict[str, dict[str, Any]] = defaultdict(dict)
    statuses: dict[str, set[Any]] = defaultdict(set)
    nested = record.get("responses")
    if nested is not None:
        if not isinstance(nested, dict):
            counts.reject(where, "responses is not an object of questions")
            return
        for question, responses in nested.items():
            if not isinstance(responses, list) or not all(isinstance(r, dict) for r in responses):
                counts.reject(where, f"responses to {question!r} are not a list of objects")
                return
            for response in responses:
                user = response.get("user_id")
                answers[user][question] = response.get("value")
                statuses[user].add(response.get("status"))
    for name, values in record.items():
        if not (isinstance(name, str) and name.endswith(".responses")):
            continue
        question = name[: -len(".responses")]
        users, status = record.get(f"{name}.users"), record.get(f"{name}.status")
        if values is None and users is None:  # a question nobody answered (Argilla fills the column)
            continue
        status = [None] * len(values) if status is None and isinstance(values, list) else status
        if not all(isinstance(v, list) for v in (values, users, status)) or not (
            len(values) == len(users) == len(status)
        ):
            counts.reject(where, f"{name}, {name}.users and {name}.status are not lists of one length")
            return
        for value, user, state in zip(values, users, status, strict=True):
            answers[user][question] = value
            statuses[user].add(state)
    for user, given in answers.items():
        known = statuses[user] - {None}
        submitted = None if not known else known == {"submitted"}
        yield _Candidate(
            where,
            key,
            f"argilla:{user}" if isinstance(user, str) else user,
            given,
            "argilla",
            note=given.pop("note", ""),
            submitted=submitted,
            record_status=record.get("status"),
        )


def import_argilla(folder: str | Path, path: str | Path, *, db: str | Path | None = None) -> ImportCounts:
    """Read Argilla's exported responses back as judgements (annotator ``argilla:<user_id>``).

    ``path`` is a ``records.json`` (nested), a flattened export (JSON list or lines), or a folder of
    them; see the module docstring for which responses count.
    """
    counts = ImportCounts()
    candidates: list[_Candidate] = []
    for where, record in _records(Path(path), "records.json", "*.json", "*.jsonl"):
        if not isinstance(record, dict):
            counts.reject(where, "not an object")
            continue
        candidates.extend(_argilla_candidates(where, record, counts))
    return _ingest(folder, db, candidates, counts)


# -- Label Studio ----------------------------------------------------------------------------


def _ls_user(completed_by: Any) -> Any:
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    if isinstance(completed_by, bool) or not isinstance(completed_by, (str, int)):
        return None
    return f"label-studio:{completed_by}"


def _ls_annotation(where: str, key: Any, ann: Any, counts: ImportCounts) -> _Candidate | None:
    if not isinstance(ann, dict) or not isinstance(ann.get("result", []), list):
        counts.reject(where, "an annotation is not an object with a result list")
        return None
    answers: dict[str, Any] = {}
    note: Any = ""
    for result in ann.get("result") or []:
        value = result.get("value") if isinstance(result, dict) else None
        name = result.get("from_name") if isinstance(result, dict) else None
        if not isinstance(value, dict) or not isinstance(name, str):
            counts.reject(where, "a result is not an object with from_name and value")
            return None
        if name == "note":
            text = value.get("text")
            note = (
                "\n".join(text) if isinstance(text, list) and all(isinstance(t, str) for t in text) else text
            )
            continue
        choices = value.get("choices")
        if not (isinstance(choices, list) and len(choices) == 1):
            counts.reject(where, f"the answer to {name!r} is not one choice")
            return None
        answers[name] = choices[0]
    return _Candidate(
        where,
        key,
        _ls_user(ann.get("completed_by")),
        answers,
        "label-studio",
        note=note,
        created_at=ann.get("created_at"),
        skipped=ann.get("was_cancelled") is True,
    )


def import_label_studio(
    folder: str | Path, path: str | Path, *, db: str | Path | None = None
) -> ImportCounts:
    """Read a Label Studio JSON or JSON-MIN export back as judgements (annotator ``label-studio:<user>``)."""
    counts = ImportCounts()
    candidates: list[_Candidate] = []
    for where, task in _records(Path(path), "*.json"):
        if not isinstance(task, dict):
            counts.reject(where, "not an object")
            continue
        data = task.get("data") if isinstance(task.get("data"), dict) else task
        meta = task.get("meta") if isinstance(task.get("meta"), dict) else {}
        key = data.get("item_key") or meta.get("item_key")
        if "annotations" in task or "drafts" in task:
            annotations, drafts = task.get("annotations") or [], task.get("drafts") or []
            if not isinstance(annotations, list) or not isinstance(drafts, list):
                counts.reject(where, "annotations or drafts is not a list")
                continue
            counts.not_submitted += len(drafts)
            for ann in annotations:
                candidate = _ls_annotation(where, key, ann, counts)
                if candidate is not None:
                    candidates.append(candidate)
        elif "annotator" in task:  # JSON-MIN: one flat row per annotation; data columns beside answers
            answers = {q: task[q] for q in _ALL_QUESTIONS if q in task}
            candidates.append(
                _Candidate(
                    where,
                    key,
                    _ls_user(task["annotator"]),
                    answers,
                    "label-studio",
                    note=task.get("note", ""),
                    created_at=task.get("created_at"),
                )
            )
        else:
            counts.reject(where, "neither annotations (JSON export) nor an annotator (JSON-MIN)")
    return _ingest(folder, db, candidates, counts)


# -- into the store --------------------------------------------------------------------------


def _check(candidate: _Candidate, item: dict[str, Any], counts: ImportCounts) -> dict[str, str] | None:
    """The clean answers of a candidate, or None (counted) when it is not a judgement to store."""
    group = [key for key, _ in QUESTIONS[item["grp"]]]
    unknown = [q for q in candidate.answers if q not in group]
    counts.unknown_answers += len(unknown)
    given = {q: v for q, v in candidate.answers.items() if q in group}
    if candidate.submitted is None:  # Argilla nested: no status (module docstring)
        answered = {q for q, v in given.items() if v is not None}
        candidate.submitted = answered == set(group) and candidate.record_status != "pending"
    if not candidate.submitted:
        counts.not_submitted += 1
        return None
    if not is_text(candidate.annotator) or len(candidate.annotator) > 300:
        counts.reject(candidate.where, "no annotator (user id) that can be stored")
        return None
    candidate.note = "" if candidate.note is None else candidate.note
    if not is_text(candidate.note):
        counts.reject(candidate.where, "the note is not valid Unicode text")
        return None
    try:
        answers = validate_answers(item["grp"], given, complete=False)
    except ValueError as exc:
        counts.reject(candidate.where, str(exc))
        return None
    if not answers and not candidate.skipped:
        counts.reject(candidate.where, "no answer to any question of its row")
        return None
    return answers


def _ingest(
    folder: str | Path, db: str | Path | None, candidates: list[_Candidate], counts: ImportCounts
) -> ImportCounts:
    store = AuditStore.for_folder(folder, db)
    by_key = {item_key(i): i for i in store.items()}
    manifest = manifest_sha256(folder)
    for candidate in candidates:
        item = by_key.get(candidate.key) if isinstance(candidate.key, str) else None
        if item is None:
            counts.unmatched += 1
            continue
        answers = _check(candidate, item, counts)
        if answers is None:
            continue
        stamp = candidate.created_at
        created_at = stamp if is_text(stamp) and len(stamp) <= 64 else None
        digest = hashlib.sha256(
            json.dumps([answers, candidate.note, candidate.skipped], sort_keys=True).encode()
        ).hexdigest()[:16]
        _, created = store.record_judgement(
            item_id=item["item_id"],
            annotator=candidate.annotator,
            answers=answers,
            note=candidate.note,
            skipped=candidate.skipped,
            submission_id=f"{candidate.source}:{candidate.key}:{candidate.annotator}:{digest}",
            manifest_sha256=manifest,
            source=candidate.source,
            created_at=created_at,
        )
        counts.imported += created
        counts.unchanged += not created
    return counts
