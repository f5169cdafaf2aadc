"""Judgements out of and into bsafe-data: the audit config rows, Argilla and Label Studio files.

* :func:`audit_config_rows`: live judgements with pseudonymous annotators, for an ``audit``
  config next to ``default`` and ``rejected`` (:data:`AUDIT_FEATURES` is its schema).
* Argilla (v2 ``Dataset.to_disk`` layout): per question group a folder with
  ``.argilla/settings.json``, ``.argilla/dataset.json`` and ``records.json``; reading back accepts
  that ``records.json`` (nested ``responses``) or a flattened export (``q.responses`` /
  ``q.responses.users`` / ``q.responses.status``), as JSON list or JSON lines.
* Label Studio: per group a folder with ``tasks.json`` (import) and ``label_config.xml`` (the
  labelling interface); reading back accepts the JSON export (``annotations[].result``) and
  JSON-MIN (flat rows with ``annotator``).
Records carry ``item_key`` = ``config:row_id``, which maps answers back to audit items.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from bsafe_data.audit.folder import manifest_sha256
from bsafe_data.audit.questions import ANSWERS, QUESTIONS, validate_answers, verdict
from bsafe_data.audit.store import AuditStore, StoreError

GUIDELINES = (
    "Content warning: these rows contain harmful text on purpose (training data for safety research). "
    "Injected rows: judge the inserted violation, its category, whether it continues the text, whether "
    "[BACKTRACK_BY_X] deletes exactly steering + violation, and whether the continuation is safe. "
    "Clean rows: is the answer safe? Rejected rows: was the rejection right? Answer yes, no or unsure."
)


def _features():
    import datasets

    return datasets.Features(
        {
            "row_id": datasets.Value("string"),
            "config": datasets.Value("string"),
            "split": datasets.Value("string"),
            "kind": datasets.Value("string"),
            "category": datasets.Value("string"),
            "annotator": datasets.Value("string"),
            "judged_at": datasets.Value("string"),
            "manifest_sha256": datasets.Value("string"),
            "source": datasets.Value("string"),
            "borderline": datasets.Value("bool"),
            "overlap": datasets.Value("bool"),
            "verdict": datasets.Value("string"),
            "answers": datasets.List(
                {"question": datasets.Value("string"), "answer": datasets.Value("string")}
            ),
            "note": datasets.Value("string"),
        }
    )


def __getattr__(name: str) -> Any:
    if name == "AUDIT_FEATURES":  # built lazily: importing `datasets` is slow
        return _features()
    raise AttributeError(name)


def pseudonyms(store: AuditStore) -> dict[str, str]:
    """``annotator -> annotator_k``, numbered by first judgement (stable: the log is append-only)."""
    order: dict[str, None] = {}
    for j in store.judgements(include_retracted=True):
        order.setdefault(j["annotator"], None)
    return {name: f"annotator_{i + 1}" for i, name in enumerate(order)}


def audit_config_rows(
    folder: str | Path, *, db: str | Path | None = None, include_notes: bool = False
) -> list[dict[str, Any]]:
    """Live, non-skipped judgements as rows of an ``audit`` config (schema :data:`AUDIT_FEATURES`).

    Annotators are pseudonymised (``annotator_1..n`` in order of first judgement). Free-text
    notes are left empty unless ``include_notes`` (they may name people or quote harmful text).
    No audit store: ``[]``.
    """
    try:
        store = AuditStore.for_folder(folder, db)
    except StoreError:
        return []
    names = pseudonyms(store)
    items = {i["item_id"]: i for i in store.items()}
    rows = []
    for j in store.judgements():
        if j["skipped"]:
            continue
        item = items[j["item_id"]]
        rows.append(
            {
                "row_id": j["row_id"],
                "config": j["config"],
                "split": item["split"],
                "kind": item["kind"],
                "category": item["category"] or "",
                "annotator": names[j["annotator"]],
                "judged_at": j["created_at"],
                "manifest_sha256": j["manifest_sha256"],
                "source": j["source"],
                "borderline": bool(item["borderline"]),
                "overlap": item["replicas"] > 1,
                "verdict": verdict(j["answers"]),
                "answers": [{"question": q, "answer": a} for q, a in sorted(j["answers"].items())],
                "note": j["note"] if include_notes else "",
            }
        )
    return rows


# -- shared record shape ---------------------------------------------------------------------


def item_key(item: dict[str, Any]) -> str:
    """The id of an audit item in exported files: ``config:row_id``."""
    return f"{item['config']}:{item['row_id']}"


def _record_fields(item: dict[str, Any]) -> dict[str, str]:
    row = item["row"]
    context = "\n\n".join(f"{t['role']}: {t['content']}" for t in row.get("context") or []) or "(none)"
    segs = {
        k: "".join(s["text"] for s in row.get("segments") or [] if s["kind"] == k)
        for k in ("prefix", "steering", "violation", "control", "continuation")
    }
    if item["grp"] == "injected":
        deleted = segs["steering"] + segs["violation"]
        return {
            "context": context,
            "prefix": segs["prefix"] or "(the violation starts the answer)",
            "steering": segs["steering"] or "(none)",
            "violation": segs["violation"],
            "control": segs["control"],
            "continuation": segs["continuation"] or "(none)",
            "deleted": "\n".join(
                f"{b['tokenizer']} X={b['tokens']}: {deleted}" for b in row.get("backtrack") or []
            )
            or "(no tokenizer recorded)",
        }
    if item["grp"] == "clean":
        return {"context": context, "answer": row.get("response") or segs["continuation"]}
    parts = [
        (s["text"] if s["kind"] == "prefix" else f"⟦{s['kind']}⟧{s['text']}")
        for s in row.get("segments") or []
    ]
    scores = "\n".join(
        f"{s['classifier']} {s['target']}: {s['label']} {float(s['score']):.3f}"
        for s in row.get("scores") or []
        if s.get("score") is not None
    )
    return {
        "context": context,
        "answer": "".join(parts) or row.get("response") or "(empty)",
        "reasons": ", ".join(row.get("reasons") or []) or "(none)",
        "scores": scores or "(none)",
    }


def _record_metadata(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "item_key": item_key(item),
        "row_id": item["row_id"],
        "config": item["config"],
        "split": item["split"],
        "kind": item["kind"],
        "category": item["category"] or "(clean)",
        "borderline": "yes" if item["borderline"] else "no",
        "replicas": item["replicas"],
    }


_FIELD_TITLES = {
    "context": "Conversation before the answer",
    "prefix": "Answer before the injection (prefix)",
    "steering": "Steering (inserted)",
    "violation": "Violation (inserted)",
    "control": "Control signal",
    "continuation": "Safe continuation (original text)",
    "deleted": "Text BACKTRACK_BY_X deletes, per tokenizer",
    "answer": "Answer",
    "reasons": "Rejection reasons",
    "scores": "Classifier scores",
}


def _groups(store: AuditStore) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in store.items(with_rows=True):
        groups[item["grp"]].append(item)
    return dict(groups)


def _fresh_dir(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- Argilla ---------------------------------------------------------------------------------


def export_argilla(folder: str | Path, out_dir: str | Path, *, db: str | Path | None = None) -> list[Path]:
    """Write one Argilla ``to_disk`` folder per question group under ``out_dir``; returns the folders.

    ``rg.Dataset.from_disk(path)`` loads each into an Argilla server.
    """
    store = AuditStore.for_folder(folder, db)
    out = _fresh_dir(Path(out_dir))
    written = []
    for group, items in sorted(_groups(store).items()):
        target = out / group
        (target / ".argilla").mkdir(parents=True)
        field_names = list(_record_fields(items[0]))
        settings = {
            "guidelines": GUIDELINES,
            "allow_extra_metadata": True,
            "fields": [
                {
                    "name": name,
                    "title": _FIELD_TITLES[name],
                    "required": True,
                    "description": None,
                    "settings": {"type": "text", "use_markdown": False},
                }
                for name in field_names
            ],
            "questions": [
                {
                    "name": key,
                    "title": text,
                    "description": None,
                    "required": True,
                    "settings": {
                        "type": "label_selection",
                        "options": [{"value": a, "text": a, "description": None} for a in ANSWERS],
                        "visible_options": None,
                    },
                }
                for key, text in QUESTIONS[group]
            ]
            + [
                {
                    "name": "note",
                    "title": "Note",
                    "description": None,
                    "required": False,
                    "settings": {"type": "text", "use_markdown": False},
                }
            ],
            "vectors": [],
            "metadata": [
                {
                    "name": name,
                    "title": name,
                    "visible_for_annotators": True,
                    "settings": {"type": "terms", "values": None},
                }
                for name in ("item_key", "row_id", "config", "split", "kind", "category", "borderline")
            ]
            + [
                {
                    "name": "replicas",
                    "title": "replicas",
                    "visible_for_annotators": False,
                    "settings": {"type": "integer", "min": None, "max": None},
                }
            ],
        }
        dataset = {
            "id": None,
            "name": f"bsafe-audit-{group}",
            "guidelines": GUIDELINES,
            "allow_extra_metadata": True,
            "status": None,
            "distribution": {"strategy": "overlap", "min_submitted": 1},
            "metadata": None,
            "workspace_id": None,
            "last_activity_at": None,
            "inserted_at": None,
            "updated_at": None,
        }
        records = [
            {
                "id": item_key(item),
                "fields": _record_fields(item),
                "metadata": _record_metadata(item),
                "suggestions": {},
                "responses": {},
                "vectors": {},
                "_server_id": None,
            }
            for item in items
        ]
        (target / ".argilla" / "settings.json").write_text(json.dumps(settings, ensure_ascii=False, indent=1))
        (target / ".argilla" / "dataset.json").write_text(json.dumps(dataset, indent=1))
        (target / "records.json").write_text(json.dumps(records, ensure_ascii=False))
        written.append(target)
    return written


def _load_json_records(path: Path, name: str) -> list[dict[str, Any]]:
    files = [path] if path.is_file() else sorted(path.rglob(name)) or sorted(path.rglob("*.json*"))
    if not files:
        raise FileNotFoundError(f"no {name} under {path}")
    records: list[dict[str, Any]] = []
    for file in files:
        if file.parent.name == ".argilla":
            continue
        text = file.read_text()
        if file.suffix == ".jsonl":
            records.extend(json.loads(line) for line in text.splitlines() if line.strip())
        else:
            data = json.loads(text)
            records.extend(data if isinstance(data, list) else [data])
    return records


def _argilla_responses(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """user -> {question: value} from a nested or flattened Argilla record (submitted only)."""
    per_user: dict[str, dict[str, Any]] = defaultdict(dict)
    nested = record.get("responses")
    if isinstance(nested, dict):
        for question, responses in nested.items():
            for r in responses or []:
                if r.get("status") not in (None, "submitted"):
                    continue
                per_user[str(r.get("user_id"))][question] = r.get("value")
    for key, values in record.items():
        if not key.endswith(".responses") or not isinstance(values, list):
            continue
        question = key[: -len(".responses")]
        users = record.get(f"{key}.users") or []
        statuses = record.get(f"{key}.status") or [None] * len(values)
        for value, user, status in zip(values, users, statuses, strict=False):
            if status in (None, "submitted"):
                per_user[str(user)][question] = value
    return dict(per_user)


def import_argilla(folder: str | Path, path: str | Path, *, db: str | Path | None = None) -> dict[str, int]:
    """Read submitted Argilla responses back as judgements (annotator ``argilla:<user_id>``)."""
    records = _load_json_records(Path(path), "records.json")
    judgements = []
    for record in records:
        key = record.get("id") or (record.get("metadata") or {}).get("item_key") or record.get("item_key")
        for user, answers in _argilla_responses(record).items():
            judgements.append(
                {
                    "key": key,
                    "annotator": f"argilla:{user}",
                    "answers": answers,
                    "created_at": None,
                    "skipped": False,
                    "source": "argilla",
                }
            )
    return _ingest(folder, db, judgements)


# -- Label Studio ----------------------------------------------------------------------------


def _label_config(group: str, field_names: list[str]) -> str:
    lines = ["<View>", '  <Header value="Content warning: harmful text on purpose (safety research data)"/>']
    for name in field_names:
        lines.append(f'  <Header value={quoteattr(_FIELD_TITLES[name])} size="5"/>')
        lines.append(f'  <Text name="{name}" value="${name}"/>')
    anchor = "violation" if group == "injected" else "answer"
    for i, (key, text) in enumerate(QUESTIONS[group], 1):
        lines.append(f'  <Header value={quoteattr(f"{i}. {text}")} size="5"/>')
        lines.append(
            f'  <Choices name="{key}" toName="{anchor}" choice="single" required="true" showInline="true">'
        )
        lines.extend(f'    <Choice value="{a}"/>' for a in ANSWERS)
        lines.append("  </Choices>")
    lines.append('  <Header value="Note" size="5"/>')
    lines.append(f'  <TextArea name="note" toName="{anchor}" rows="2" maxSubmissions="1"/>')
    lines.append("</View>")
    return "\n".join(lines) + "\n"


def export_label_studio(
    folder: str | Path, out_dir: str | Path, *, db: str | Path | None = None
) -> list[Path]:
    """Write ``tasks.json`` and ``label_config.xml`` per question group under ``out_dir``; returns folders."""
    store = AuditStore.for_folder(folder, db)
    out = _fresh_dir(Path(out_dir))
    written = []
    for group, items in sorted(_groups(store).items()):
        target = out / group
        target.mkdir(parents=True)
        field_names = list(_record_fields(items[0]))
        tasks = [
            {"data": {**_record_fields(item), **_record_metadata(item)}, "meta": {"item_key": item_key(item)}}
            for item in items
        ]
        (target / "tasks.json").write_text(json.dumps(tasks, ensure_ascii=False))
        (target / "label_config.xml").write_text(_label_config(group, field_names))
        written.append(target)
    return written


def _ls_user(completed_by: Any) -> str:
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id"))
    return str(completed_by)


def import_label_studio(
    folder: str | Path, path: str | Path, *, db: str | Path | None = None
) -> dict[str, int]:
    """Read a Label Studio JSON or JSON-MIN export back as judgements (annotator ``label-studio:<user>``)."""
    tasks = _load_json_records(Path(path), "*.json")
    questions = {key for qs in QUESTIONS.values() for key, _ in qs}
    judgements = []
    for task in tasks:
        data = task.get("data") if isinstance(task.get("data"), dict) else task
        key = data.get("item_key") or (task.get("meta") or {}).get("item_key")
        if "annotations" in task:
            for ann in task.get("annotations") or []:
                answers: dict[str, Any] = {}
                note = ""
                for r in ann.get("result") or []:
                    value = r.get("value") or {}
                    if r.get("from_name") in questions and value.get("choices"):
                        answers[r["from_name"]] = value["choices"][0]
                    elif r.get("from_name") == "note" and value.get("text"):
                        note = "\n".join(value["text"])
                judgements.append(
                    {
                        "key": key,
                        "annotator": f"label-studio:{_ls_user(ann.get('completed_by'))}",
                        "answers": answers,
                        "note": note,
                        "created_at": ann.get("created_at"),
                        "skipped": bool(ann.get("was_cancelled")),
                        "source": "label-studio",
                    }
                )
        elif "annotator" in task:  # JSON-MIN: one flat row per annotation
            answers = {q: task[q] for q in questions if isinstance(task.get(q), str)}
            judgements.append(
                {
                    "key": key,
                    "annotator": f"label-studio:{_ls_user(task['annotator'])}",
                    "answers": answers,
                    "note": task.get("note") if isinstance(task.get("note"), str) else "",
                    "created_at": task.get("created_at"),
                    "skipped": False,
                    "source": "label-studio",
                }
            )
    return _ingest(folder, db, judgements)


def _ingest(folder: str | Path, db: str | Path | None, judgements: list[dict[str, Any]]) -> dict[str, int]:
    store = AuditStore.for_folder(folder, db)
    by_key = {item_key(i): i for i in store.items()}
    manifest = manifest_sha256(folder)
    counts = {"imported": 0, "unchanged": 0, "unmatched": 0, "invalid": 0}
    for j in judgements:
        item = by_key.get(j["key"])
        if item is None:
            counts["unmatched"] += 1
            continue
        note = j.get("note") or j["answers"].pop("note", None) or ""
        if isinstance(note, list):
            note = "\n".join(map(str, note))
        try:
            answers = validate_answers(item["grp"], j["answers"], complete=False)
        except ValueError:
            counts["invalid"] += 1
            continue
        if not answers and not j["skipped"]:
            counts["invalid"] += 1
            continue
        digest = hashlib.sha256(
            json.dumps([answers, str(note), j["skipped"]], sort_keys=True).encode()
        ).hexdigest()[:16]
        _, created = store.record_judgement(
            item_id=item["item_id"],
            annotator=j["annotator"],
            answers=answers,
            note=str(note),
            skipped=j["skipped"],
            submission_id=f"{j['source']}:{j['key']}:{j['annotator']}:{digest}",
            manifest_sha256=manifest,
            source=j["source"],
            created_at=j.get("created_at"),
        )
        counts["imported" if created else "unchanged"] += 1
    return counts
