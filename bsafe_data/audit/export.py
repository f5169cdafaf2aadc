"""Judgements out of bsafe-data: the audit config rows, Argilla and Label Studio files.

* :func:`audit_config_rows`: live judgements with pseudonymous annotators, for an ``audit``
  config next to ``default`` and ``rejected`` (:data:`AUDIT_FEATURES` is its schema).
* Argilla (v2 ``Dataset.to_disk`` layout, loaded by ``rg.Dataset.from_disk``): per question group
  and number of annotators a folder with ``.argilla/settings.json``, ``.argilla/dataset.json`` and
  ``records.json``.
* Label Studio: per question group and number of annotators a folder with ``tasks.json`` (import),
  ``label_config.xml`` (the labelling interface) and ``project.json`` (the project's settings for
  ``POST /api/projects``: title, label config, instructions, annotators per task).

Rows of the overlap need ``replicas`` annotators each, the others one: they go to their own folder
(``injected-overlap-x2``) whose settings say so (Argilla's task distribution ``min_submitted``,
Label Studio's ``maximum_annotations`` with ``overlap_cohort_percentage`` 100), since both tools
set it per dataset or project, not per record. Records carry ``item_key`` = ``config:row_id``,
which maps answers back to audit items (``bsafe_data.audit.imports``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from bsafe_data.audit.questions import ANSWERS, QUESTIONS, verdict
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


def _batches(store: AuditStore) -> list[tuple[str, str, int, list[dict[str, Any]]]]:
    """``(folder name, question group, annotators per row, items)``: one per group and replicas."""
    batches: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for item in store.items(with_rows=True):
        batches[(item["grp"], int(item["replicas"]))].append(item)
    return [
        (group if replicas == 1 else f"{group}-overlap-x{replicas}", group, replicas, items)
        for (group, replicas), items in sorted(batches.items())
    ]


def _fresh_dir(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- Argilla ---------------------------------------------------------------------------------


def export_argilla(folder: str | Path, out_dir: str | Path, *, db: str | Path | None = None) -> list[Path]:
    """Write one Argilla ``to_disk`` folder per question group and number of annotators under
    ``out_dir``; returns the folders. ``rg.Dataset.from_disk(path)`` loads each into an Argilla server.
    """
    store = AuditStore.for_folder(folder, db)
    out = _fresh_dir(Path(out_dir))
    written = []
    for name, group, replicas, items in _batches(store):
        target = out / name
        (target / ".argilla").mkdir(parents=True)
        field_names = list(_record_fields(items[0]))
        # a record is complete once this many annotators submitted it (Argilla's task distribution)
        distribution = {"strategy": "overlap", "min_submitted": replicas}
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
            "distribution": distribution,
            "mapping": None,
        }
        dataset = {
            "id": None,
            "name": f"bsafe-audit-{name}",
            "guidelines": GUIDELINES,
            "allow_extra_metadata": True,
            "status": "draft",  # what Argilla writes for a dataset not yet published (null does not load)
            "distribution": distribution,
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
    """Write ``tasks.json``, ``label_config.xml`` and ``project.json`` per question group and number of
    annotators under ``out_dir`` (module docstring); returns the folders."""
    store = AuditStore.for_folder(folder, db)
    out = _fresh_dir(Path(out_dir))
    written = []
    for name, group, replicas, items in _batches(store):
        target = out / name
        target.mkdir(parents=True)
        config = _label_config(group, list(_record_fields(items[0])))
        tasks = [
            {"data": {**_record_fields(item), **_record_metadata(item)}, "meta": {"item_key": item_key(item)}}
            for item in items
        ]
        project = {
            "title": f"bsafe-audit {name}",
            "description": f"{len(items)} {group} rows, {replicas} annotator(s) each",
            "label_config": config,
            "expert_instruction": GUIDELINES,
            "show_instruction": True,
            # every task of this project is complete after `replicas` annotations (the overlap)
            "maximum_annotations": replicas,
            "overlap_cohort_percentage": 100,
            "show_overlap_first": replicas > 1,
        }
        (target / "tasks.json").write_text(json.dumps(tasks, ensure_ascii=False))
        (target / "label_config.xml").write_text(config)
        (target / "project.json").write_text(json.dumps(project, ensure_ascii=False, indent=1))
        written.append(target)
    return written
