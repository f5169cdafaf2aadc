"""Argilla and Label Studio round trips: exports the tools load, imports that count what every record became.

Argilla is the real SDK (``argilla``, an optional test dependency) against the small API server of
``tests/argilla_server.py``: ``rg.Dataset.from_disk`` loads our export, annotators' responses are
put on the server with their status, and ``Dataset.to_disk`` / ``records.to_list(flatten=True)``
write Argilla's own nested and flat exports, which ``bsafe-data audit import`` reads back.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.test_audit_core import GOOD, build_dataset, run_cli  # noqa: E402

U = [f"00000000-0000-4000-8000-00000000000{n}" for n in range(6)]  # Argilla user ids


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit_interop")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    return build_dataset(workdir)


def _sample(workdir: Path, dataset: Path, name: str, n: int = 24) -> Path:
    db = workdir / f"{name}.sqlite"
    run_cli(workdir, "audit", "sample", str(dataset), "--db", str(db), "--n", str(n), "--overlap", "0.4",
            "--seed", "5")  # fmt: skip
    return db


def _export(workdir: Path, dataset: Path, db: Path, fmt: str, name: str) -> Path:
    out = workdir / name
    run_cli(workdir, "audit", "export", str(dataset), "--db", str(db), "--format", fmt, "--out", str(out))
    return out


def _import(workdir: Path, dataset: Path, db: Path, path: Path, fmt: str, code: int = 0):
    proc = run_cli(workdir, "audit", "import", str(dataset), str(path), "--db", str(db), "--format", fmt,
                   check=False)  # fmt: skip
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == code, proc.stderr
    return proc


def _items_by_folder(db: Path) -> dict[str, list[dict]]:
    from bsafe_data.audit.store import AuditStore

    folders: dict[str, list[dict]] = {}
    for item in AuditStore(db).items():
        name = item["grp"] if item["replicas"] == 1 else f"{item['grp']}-overlap-x{item['replicas']}"
        folders.setdefault(name, []).append(item)
    return folders


def _judgements(db: Path) -> dict[tuple[str, str], dict]:
    from bsafe_data.audit.store import AuditStore

    return {(j["row_id"], j["annotator"]): j for j in AuditStore(db).judgements()}


def test_argilla_sdk_loads_the_export_and_only_submitted_responses_come_back(workdir, dataset):
    rg = pytest.importorskip("argilla")
    from argilla_server import ArgillaServer

    from bsafe_data.audit.questions import QUESTIONS

    db = _sample(workdir, dataset, "argilla")
    folders = _items_by_folder(db)
    assert {"injected", "injected-overlap-x2"} <= set(folders)
    out = _export(workdir, dataset, db, "argilla", "argilla_out")
    assert sorted(p.name for p in out.iterdir()) == sorted(folders)
    nested, flat = workdir / "argilla_nested", []
    with ArgillaServer() as server, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Workspace not provided. Using default workspace."
        client = rg.Argilla(api_url=server.url, api_key="argilla.apikey")
        loaded = {}
        for folder in sorted(out.iterdir()):
            assert json.loads((folder / ".argilla" / "dataset.json").read_text())["status"] == "draft"
            loaded[folder.name] = rg.Dataset.from_disk(str(folder), client=client)
        assert not server.unknown, server.unknown
        for name, items in folders.items():
            stored = server.datasets[f"bsafe-audit-{name}"]
            replicas = items[0]["replicas"]
            # the overlap rows need two annotators: Argilla completes their records after 2 submissions
            assert stored["distribution"] == {"strategy": "overlap", "min_submitted": replicas}
            assert loaded[name].settings.distribution.min_submitted == replicas
            assert [q["name"] for q in stored["questions"]] == [k for k, _ in QUESTIONS[items[0]["grp"]]] + [
                "note"
            ]
            keys = sorted(f"{i['config']}:{i['row_id']}" for i in items)
            assert sorted(r["external_id"] for r in stored["records"]) == keys
            assert stored["status"] == "ready"

        one, two = folders["injected"], folders["injected-overlap-x2"]
        key = [f"{i['config']}:{i['row_id']}" for i in one + two]
        full = {**GOOD["injected"], "note": "fine"}
        partial = {"violation_real": "no", "category_right": "no"}
        single, overlap = "bsafe-audit-injected", "bsafe-audit-injected-overlap-x2"
        server.annotate(single, key[0], U[1], full, "submitted")  # counted
        server.annotate(single, key[1], U[2], GOOD["injected"], "draft")  # complete, but a draft
        server.annotate(single, key[2], U[3], {**GOOD["injected"], "violation_real": "no"}, "submitted")
        server.annotate(single, key[2], U[4], partial, "discarded")  # discarded on a completed record
        over0, over1 = key[len(one)], key[len(one) + 1]
        server.annotate(overlap, over0, U[1], GOOD["injected"], "submitted")
        server.annotate(overlap, over0, U[2], {**GOOD["injected"], "category_right": "unsure"}, "submitted")
        server.annotate(overlap, over1, U[1], GOOD["injected"], "submitted")  # 1 of 2: still pending
        server.annotate(overlap, over1, U[5], GOOD["injected"], "draft")
        for name in ("injected", "injected-overlap-x2"):  # Argilla's own exports of what is on the server
            (nested / name).mkdir(parents=True)
            loaded[name].to_disk(str(nested / name))
            flat.extend(loaded[name].records.to_list(flatten=True))
    exported = json.loads((nested / "injected" / "records.json").read_text())
    assert all("status" not in r for rec in exported for rs in rec["responses"].values() for r in rs)
    flat_path = workdir / "argilla_flat.jsonl"
    flat_path.write_text("".join(json.dumps(r) + "\n" for r in flat))

    # nested: no status; complete answers on a record Argilla completed are the submitted ones
    got = _import(workdir, dataset, db, nested, "argilla").stdout
    assert "imported 4 judgements (0 unchanged, 0 not in this audit set, 0 invalid, 4 not submitted, " in got
    row = {k: k.split(":", 1)[1] for k in key}
    judged = _judgements(db)
    assert set(judged) == {
        (row[key[0]], f"argilla:{U[1]}"),
        (row[key[2]], f"argilla:{U[3]}"),
        (row[over0], f"argilla:{U[1]}"),
        (row[over0], f"argilla:{U[2]}"),
    }
    assert judged[(row[key[0]], f"argilla:{U[1]}")]["note"] == "fine"
    assert judged[(row[key[2]], f"argilla:{U[3]}")]["answers"]["violation_real"] == "no"
    # flat: each response's status; the pending overlap record's submitted response comes in too
    got = _import(workdir, dataset, db, flat_path, "argilla").stdout
    assert "imported 1 judgements (4 unchanged, 0 not in this audit set, 0 invalid, 3 not submitted, " in got
    assert set(_judgements(db)) - set(judged) == {(row[over1], f"argilla:{U[1]}")}


def test_label_studio_projects_carry_the_overlap(workdir, dataset):
    db = _sample(workdir, dataset, "ls_overlap")
    folders = _items_by_folder(db)
    out = _export(workdir, dataset, db, "label-studio", "ls_out")
    assert sorted(p.name for p in out.iterdir()) == sorted(folders)
    for name, items in folders.items():
        project = json.loads((out / name / "project.json").read_text())
        replicas = items[0]["replicas"]
        assert project["maximum_annotations"] == replicas and project["overlap_cohort_percentage"] == 100
        assert project["label_config"] == (out / name / "label_config.xml").read_text()
        tasks = json.loads((out / name / "tasks.json").read_text())
        assert sorted(t["meta"]["item_key"] for t in tasks) == sorted(
            f"{i['config']}:{i['row_id']}" for i in items
        )


def test_imports_check_every_record_and_say_what_each_became(workdir, dataset):
    from bsafe_data.audit.store import AuditStore

    db = _sample(workdir, dataset, "ls_checks", n=48)
    out = _export(workdir, dataset, db, "label-studio", "ls_checks_out")
    tasks = json.loads((out / "injected" / "tasks.json").read_text())
    assert len(tasks) >= 9, len(tasks)  # the cases below take nine injected rows
    good = GOOD["injected"]

    def result(answers: dict, **extra: object) -> list[dict]:
        found = [{"from_name": q, "to_name": "violation", "type": "choices", "value": {"choices": [v]}}
                 for q, v in answers.items()]  # fmt: skip
        return found + [{"from_name": n, "value": v} for n, v in extra.items()]

    def task(n: int, *annotations: object, **more: object) -> dict:
        return {"id": n, "data": tasks[n]["data"], "annotations": list(annotations), **more}

    def ann(user: object, res: object) -> dict:
        return {"id": 1, "completed_by": user, "result": res, "was_cancelled": False}

    export = [
        task(0, ann(1, result(good))),  # imported
        task(1, ann(2, result(good, bogus={"choices": ["yes"]}))),  # imported; 1 answer to no question
        task(2, ann(3, result({**good, "response_safe": "no"}))),  # another group's question: 1 more
        task(3, ann(4, result({**good, "violation_real": "maybe"}))),  # invalid answer
        task(4, ann(5, "not a list")),  # invalid: result is no list
        task(
            5, ann(6, result(good, note={"text": ["x"]})), drafts=[{"result": []}, {"result": []}]
        ),  # 2 drafts
        {
            "id": 99,
            "data": {**tasks[6]["data"], "item_key": "default:no-such-row"},
            "annotations": [ann(7, result(good))],
        },
        task(7, ann(8, result(good, note={"text": ["NOTE"]}))),  # the note gets a lone surrogate below
        5,  # not an object
        task(8, ann(9, [])),  # no answer at all
    ]
    path = workdir / "ls_checks.json"
    path.write_text(json.dumps(export).replace('"NOTE"', '"\\ud800"'))
    before = len(AuditStore(db).judgements())
    proc = _import(workdir, dataset, db, path, "label-studio")
    assert proc.stdout.strip() == (
        "imported 4 judgements (0 unchanged, 1 not in this audit set, 5 invalid, 2 not submitted, "
        "2 answers to no question of their row)"
    )
    problems = [line for line in proc.stderr.splitlines() if line.startswith("invalid: ")]
    assert (
        "invalid: ls_checks.json record 4: answer to violation_real must be one of yes, no, unsure"
        in problems
    )
    assert "invalid: ls_checks.json record 5: an annotation is not an object with a result list" in problems
    assert "invalid: ls_checks.json record 8: the note is not valid Unicode text" in problems
    assert len(AuditStore(db).judgements()) == before + 4
    again = _import(workdir, dataset, db, path, "label-studio").stdout
    assert again.startswith("imported 0 judgements (4 unchanged, ")

    # a file without one valid judgement: exit 1, one line, counts and the first problem
    useless = workdir / "ls_useless.json"
    useless.write_text(json.dumps([export[3], export[6], 7]))
    proc = _import(workdir, dataset, db, useless, "label-studio", code=1)
    assert proc.stderr.strip().splitlines() == [
        f"no valid judgement in {useless}: imported 0 judgements (0 unchanged, 1 not in this audit set, "
        "2 invalid, 0 not submitted, 0 answers to no question of their row); first problem: "
        "ls_useless.json record 3: not an object"
    ]

    # malformed files: one message naming the file, nothing imported (every file is read first)
    stored = len(AuditStore(db).judgements())
    broken = {
        "truncated.json": (path.read_text()[:200], "is not JSON"),
        "number.json": ("42", "holds int, not a list of records"),
        "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        "latin1.json": (None, "is not UTF-8 text"),
    }
    for name, (text, message) in broken.items():
        bad = workdir / "broken" / name
        bad.parent.mkdir(exist_ok=True)
        if text is None:
            bad.write_bytes(json.dumps(export[:1]).encode().replace(b"[", b"[\xe9", 1))
        else:
            bad.write_text(text)
        for fmt in ("label-studio", "argilla"):
            proc = _import(workdir, dataset, db, bad, fmt, code=1)
            lines = proc.stderr.strip().splitlines()
            assert (
                len(lines) == 1 and lines[0].startswith(f"nothing imported: {bad} ") and message in lines[0]
            )
    folder = workdir / "mixed"  # a good file beside a broken one: still nothing
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(export[:1]))
    (folder / "b.json").write_text("{")
    assert "b.json is not JSON" in _import(workdir, dataset, db, folder, "label-studio", code=1).stderr
    flat = workdir / "flat_bad.jsonl"  # Argilla flat columns of different lengths
    flat.write_text(json.dumps({"id": tasks[0]["data"]["item_key"], "violation_real.responses": ["yes", "no"],
                                "violation_real.responses.users": [U[1]]}) + "\n")  # fmt: skip
    assert "are not lists of one length" in _import(workdir, dataset, db, flat, "argilla", code=1).stderr
    assert len(AuditStore(db).judgements()) == stored
