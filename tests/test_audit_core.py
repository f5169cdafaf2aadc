"""Audit set sampling, agreement maths, judgements back into the data, exports and the report.

Datasets are built with the real CLI (`python -m bsafe_data build`); judgements are written
through the store the server uses. The helpers at the top are shared by the other
test_audit_*.py files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "bsafe_plus.yaml"


# -- shared helpers (imported by test_audit_server.py and test_audit_browser.py) ---------------


def cli_env(tmp: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: offline, caches inside the test's temp folder."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HOME": str(tmp / "hf_home"),
            "BSAFE_DATA_CACHE_DIR": str(tmp / "bsafe_cache"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def run_cli(tmp: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m bsafe_data ARGS` (the real CLI) and return the finished process."""
    proc = subprocess.run(
        [sys.executable, "-m", "bsafe_data", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp),
        cwd=str(tmp),
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"bsafe-data {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc


def build_dataset(tmp: Path, name: str = "ds", *extra: str) -> Path:
    """A small real dataset folder built by the CLI (`--limit 40` unless `extra` says otherwise)."""
    out = tmp / name
    args = ["build", str(RECIPE), "--out", str(out), *extra]
    if "--limit" not in extra and "--source" not in extra:
        args += ["--limit", "40"]
    run_cli(tmp, *args)
    assert (out / "manifest.json").exists()
    return out


def add_annotator(tmp: Path, folder: Path, name: str) -> str:
    """`bsafe-data audit annotators add`: the token is the only line on stdout."""
    proc = run_cli(tmp, "audit", "annotators", "add", str(folder), name)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bsa_"), proc.stdout
    return lines[0]


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit_core")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    return build_dataset(workdir)


def _fresh_db(workdir: Path, dataset: Path, name: str, *args: str) -> Path:
    db = workdir / f"{name}.sqlite"
    run_cli(workdir, "audit", "sample", str(dataset), "--db", str(db), *args)
    return db


def _items(db: Path) -> list[dict]:
    from bsafe_data.audit.store import AuditStore

    return AuditStore(db).items(with_rows=True)


# -- sampling --------------------------------------------------------------------------------


def test_sample_covers_strata_borderline_and_overlap(workdir, dataset):
    from bsafe_data.audit.folder import classifier_thresholds, iter_rows, threshold_margin

    db = _fresh_db(
        workdir, dataset, "s1", "--n", "60", "--overlap", "0.25", "--borderline", "0.2", "--seed", "5"
    )
    items = _items(db)
    assert len(items) == 60
    assert {i["config"] for i in items} == {"default", "rejected"}
    assert {i["kind"] for i in items} == {"injected", "clean"}
    assert {i["fifth"] for i in items if i["kind"] == "injected"} == {1, 2, 3, 4, 5}
    assert len({i["category"] for i in items if i["category"]}) >= 12
    # every rejected row of this small build is in: 7 rows, and rare values get a sqrt share
    rejected_rows = sum(1 for c, _, _ in iter_rows(dataset) if c == "rejected")
    assert sum(i["config"] == "rejected" for i in items) == min(rejected_rows, 60)
    # overlap: exactly round(60 * 0.25) items for two annotators
    assert sum(i["replicas"] == 2 for i in items) == 15
    assert all(i["replicas"] in (1, 2) for i in items)
    # borderline: the 12 rows closest to a threshold (within 0.15), none closer left out
    thresholds = classifier_thresholds(dataset)
    assert thresholds == {"builtin": 0.5}
    border = [i for i in items if i["borderline"]]
    margins = [threshold_margin(r, thresholds) for _, _, r in iter_rows(dataset)]
    near = sum(1 for m in margins if m is not None and m <= 0.15)
    assert near >= 5 and len(border) == min(12, near)
    worst = max(i["margin"] for i in border)
    chosen_ids = {i["row_id"] for i in items}
    closer = [r["id"] for _, _, r in iter_rows(dataset) if (threshold_margin(r, thresholds) or 1) < worst]
    assert set(closer) <= chosen_ids
    for i in border:
        assert i["margin"] == pytest.approx(threshold_margin(i["row"], thresholds))
    # the snapshot is the row as built
    assert all(i["row"]["id"] == i["row_id"] for i in items)


def test_sample_is_deterministic_and_refuses_to_clobber(workdir, dataset):
    a = _fresh_db(workdir, dataset, "det_a", "--n", "30", "--seed", "11")
    b = _fresh_db(workdir, dataset, "det_b", "--n", "30", "--seed", "11")
    c = _fresh_db(workdir, dataset, "det_c", "--n", "30", "--seed", "12")
    key = lambda db: [(i["row_id"], i["replicas"], i["borderline"]) for i in _items(db)]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    again = run_cli(workdir, "audit", "sample", str(dataset), "--db", str(a), "--n", "30", check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    bad = run_cli(workdir, "audit", "sample", str(dataset), "--db", str(a), "--strata", "colour", check=False)
    assert bad.returncode == 2 and "unknown strata" in bad.stderr


def test_strata_option_limits_the_dimensions(workdir, dataset):
    db = _fresh_db(workdir, dataset, "s_cfg", "--n", "20", "--strata", "config", "--seed", "1")
    items = _items(db)
    assert {i["stratum"] for i in items} == {"config=default", "config=rejected"}


# -- agreement maths -------------------------------------------------------------------------


def test_wilson_interval_known_values():
    from bsafe_data.audit.stats import wilson_interval

    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)


def test_cohen_kappa_by_hand():
    from bsafe_data.audit.stats import cohen_kappa

    a = ["yes", "yes", "no", "no", "yes", "unsure", "yes", "no"]
    b = ["yes", "no", "no", "no", "yes", "yes", "yes", "unsure"]
    p_o = 5 / 8
    # marginals: a yes 4 no 3 unsure 1; b yes 4 no 3 unsure 1
    p_e = (4 * 4 + 3 * 3 + 1 * 1) / 64
    assert cohen_kappa(a, b) == pytest.approx((p_o - p_e) / (1 - p_e))
    assert cohen_kappa(["yes"] * 3, ["yes"] * 3) is None
    assert cohen_kappa([], []) is None


def test_krippendorff_alpha_reference_example():
    """Krippendorff (2011), nominal example with 4 coders and missing values: alpha = 0.743."""
    from bsafe_data.audit.stats import cohen_kappa, krippendorff_alpha_nominal

    m = None
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, m, m, m],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, m, 3],
        [m, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, m],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, m],
    ]
    units = [[c[u] for c in coders if c[u] is not None] for u in range(12)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
    # two coders, no missing values: alpha = kappa corrected for sample size (close to kappa)
    a, b = ["y", "y", "n", "n", "y", "n"], ["y", "n", "n", "n", "y", "n"]
    alpha = krippendorff_alpha_nominal(list(zip(a, b, strict=True)))
    assert alpha == pytest.approx(1 - (6 * 2 - 1) * (2 / 6) / (2 * 5 * 7 / 6), abs=1e-9)
    assert abs(alpha - cohen_kappa(a, b)) < 0.1
    assert krippendorff_alpha_nominal([["y", "y"], ["y", "y"]]) is None


# -- judgements back into the data -----------------------------------------------------------


def _judge(store, item, annotator, answers, *, skipped=False, note="", tag=""):
    return store.record_judgement(
        item_id=item["item_id"],
        annotator=annotator,
        answers=answers,
        note=note,
        skipped=skipped,
        submission_id=f"{annotator}:{item['item_id']}:{tag}{json.dumps(answers, sort_keys=True)}:{skipped}",
        manifest_sha256="test",
    )


GOOD = {
    "injected": {
        "violation_real": "yes",
        "category_right": "yes",
        "continues_text": "yes",
        "backtrack_exact": "yes",
        "continuation_safe": "yes",
    },
    "clean": {"response_safe": "yes"},
    "rejected": {"rejection_right": "no"},
}


def _bad(group: str) -> dict:
    if group == "injected":
        return {**GOOD["injected"], "continuation_safe": "no"}
    return {"clean": {"response_safe": "no"}, "rejected": {"rejection_right": "yes"}}[group]


def test_annotator_rejections_any_and_majority(workdir, dataset):
    from bsafe_data.audit.apply import annotator_rejections
    from bsafe_data.audit.store import AuditStore

    db = _fresh_db(workdir, dataset, "apply", "--n", "40", "--seed", "3", "--overlap", "0.5")
    store = AuditStore(db)
    kept = [i for i in store.items() if i["config"] == "default"]
    rejected = [i for i in store.items() if i["config"] == "rejected"]
    assert len(kept) >= 12 and rejected
    k = kept
    # row -> votes of a, b, c
    _judge(store, k[0], "a", _bad(k[0]["grp"]))  # 1/1 bad
    _judge(store, k[1], "a", _bad(k[1]["grp"]))  # 1/2 bad: any only
    _judge(store, k[1], "b", GOOD[k[1]["grp"]])
    _judge(store, k[2], "a", _bad(k[2]["grp"]))  # 2/3 bad: both
    _judge(store, k[2], "b", _bad(k[2]["grp"]))
    _judge(store, k[2], "c", GOOD[k[2]["grp"]])
    _judge(store, k[3], "a", GOOD[k[3]["grp"]])  # 0/2 bad
    _judge(store, k[3], "b", GOOD[k[3]["grp"]])
    unsure = {key: "unsure" for key in GOOD[k[4]["grp"]]}
    _judge(store, k[4], "a", unsure)  # unsure is not bad
    _judge(store, k[5], "a", {}, skipped=True)  # a skip is no vote
    _judge(store, k[6], "a", _bad(k[6]["grp"]))  # bad, then undone
    assert store.undo_last("a")["item_id"] == k[6]["item_id"]
    _judge(store, k[7], "a", _bad(k[7]["grp"]))  # bad, then re-judged good (superseded)
    _judge(store, k[7], "a", GOOD[k[7]["grp"]], tag="again")
    _judge(store, k[8], "a", _bad(k[8]["grp"]))  # 2/4 bad: a tie keeps it under majority
    _judge(store, k[8], "b", _bad(k[8]["grp"]))
    _judge(store, k[8], "c", GOOD[k[8]["grp"]])
    _judge(store, k[8], "d", GOOD[k[8]["grp"]])
    _judge(store, rejected[0], "a", {"rejection_right": "yes"})  # not kept: never returned

    any_ = annotator_rejections(dataset, "any", db=db)
    majority = annotator_rejections(dataset, "majority", db=db)
    ids = [i["row_id"] for i in k]
    assert set(any_) == {ids[0], ids[1], ids[2], ids[8]}
    assert set(majority) == {ids[0], ids[2]}
    assert any_[ids[2]].startswith("2/3 annotators judged it bad")
    bad_q = "continuation_safe=no" if k[2]["grp"] == "injected" else "response_safe=no"
    assert bad_q in any_[ids[2]]
    with pytest.raises(ValueError):
        annotator_rejections(dataset, "all", db=db)  # type: ignore[arg-type]
    assert annotator_rejections(workdir / "nowhere") == {}


def test_audit_config_rows_pseudonymise_by_first_judgement(workdir, dataset):
    from bsafe_data.audit.export import audit_config_rows
    from bsafe_data.audit.store import AuditStore

    db = _fresh_db(workdir, dataset, "export_rows", "--n", "10", "--seed", "4")
    store = AuditStore(db)
    items = store.items()
    _judge(store, items[0], "zoe.real-name", GOOD[items[0]["grp"]], note="private remark")
    _judge(store, items[1], "adam", _bad(items[1]["grp"]))
    _judge(store, items[2], "zoe.real-name", GOOD[items[2]["grp"]])
    _judge(store, items[3], "adam", {}, skipped=True)
    rows = audit_config_rows(dataset, db=db)
    assert [r["annotator"] for r in rows] == ["annotator_1", "annotator_2", "annotator_1"]
    assert [r["row_id"] for r in rows] == [items[0]["row_id"], items[1]["row_id"], items[2]["row_id"]]
    assert rows[1]["verdict"] == "bad" and rows[0]["verdict"] == "good"
    text = json.dumps(rows)
    assert "zoe" not in text and "adam" not in text and "private remark" not in text
    assert audit_config_rows(dataset, db=db, include_notes=True)[0]["note"] == "private remark"
    # the rows fit the published schema
    import datasets

    from bsafe_data.audit import export

    ds = datasets.Dataset.from_list(rows, features=export.AUDIT_FEATURES)
    assert ds.num_rows == 3 and ds.features == export.AUDIT_FEATURES


def test_card_section_and_report_cli(workdir, dataset):
    from bsafe_data.audit.report import card_section
    from bsafe_data.audit.store import AuditStore

    assert card_section(dataset) is None  # no store in the folder yet
    run_cli(workdir, "audit", "sample", str(dataset), "--n", "20", "--seed", "9", "--overlap", "1.0")
    store = AuditStore.for_folder(dataset)
    assert card_section(dataset) is None  # a set, but nothing judged
    items = store.items()
    for n, item in enumerate(items):
        _judge(store, item, "ann1", GOOD[item["grp"]] if n % 3 else _bad(item["grp"]))
        _judge(store, item, "ann2", GOOD[item["grp"]] if n % 4 else _bad(item["grp"]))
    section = card_section(dataset)
    assert section["items"] == 20 and section["judgements"] == 40 and section["annotators"] == 2
    assert section["agreement"]["overlap_items"] == 20
    assert {q["question"] for q in section["questions"]} <= {
        "violation_real",
        "category_right",
        "continues_text",
        "backtrack_exact",
        "continuation_safe",
        "response_safe",
        "rejection_right",
    }
    json.dumps(section)  # card-ready: plain JSON

    proc = run_cli(workdir, "audit", "report", str(dataset), "--json")
    report = json.loads(proc.stdout)
    assert report["judgements"] == 40
    plot = Path(report["plot"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the row verdict kappa, by hand from the same judgements
    verdicts = {}
    for j in store.judgements():
        from bsafe_data.audit.questions import verdict

        verdicts.setdefault(j["item_id"], {})[j["annotator"]] = verdict(j["answers"])
    a = [v["ann1"] for v in verdicts.values()]
    b = [v["ann2"] for v in verdicts.values()]
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in set(a) | set(b)) / n**2
    assert report["verdict_agreement"]["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    # pipeline confusion adds up to the judgements
    pipeline = report["confusion"]["pipeline"]
    assert sum(sum(v.values()) for v in pipeline.values()) == 40
    human = run_cli(workdir, "audit", "report", str(dataset))
    assert "Wilson" in human.stdout and "kappa" in human.stdout


# -- tokens ----------------------------------------------------------------------------------


def test_annotator_token_is_stored_hashed(workdir, dataset):
    db_folder = workdir / "tok"
    db_folder.mkdir()
    db = db_folder / "t.sqlite"
    run_cli(workdir, "audit", "sample", str(dataset), "--db", str(db), "--n", "5")
    proc = run_cli(workdir, "audit", "annotators", "add", str(dataset), "alice", "--db", str(db))
    token = proc.stdout.strip()
    assert token.startswith("bsa_") and len(token) > 40
    raw = b"".join(p.read_bytes() for p in db_folder.iterdir())
    assert token.encode() not in raw
    again = run_cli(
        workdir, "audit", "annotators", "add", str(dataset), "alice", "--db", str(db), check=False
    )
    assert again.returncode == 2 and "--rotate" in again.stderr and "bsa_" not in again.stdout
    names = run_cli(workdir, "audit", "annotators", "list", str(dataset), "--db", str(db))
    assert names.stdout.split() == ["alice"]
    from bsafe_data.audit.auth import Authenticator
    from bsafe_data.audit.store import AuditStore

    auth = Authenticator(AuditStore(db))
    assert auth.verify_token(token) == "alice"
    assert auth.verify_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None


# -- interop ---------------------------------------------------------------------------------


def test_argilla_export_and_import(workdir, dataset):
    db = _fresh_db(workdir, dataset, "argilla", "--n", "12", "--seed", "2")
    out = workdir / "argilla_out"
    run_cli(
        workdir, "audit", "export", str(dataset), "--db", str(db), "--format", "argilla", "--out", str(out)
    )
    groups = sorted(p.name for p in out.iterdir())
    assert "injected" in groups
    settings = json.loads((out / "injected" / ".argilla" / "settings.json").read_text())
    assert [q["name"] for q in settings["questions"]][:5] == [
        "violation_real",
        "category_right",
        "continues_text",
        "backtrack_exact",
        "continuation_safe",
    ]
    assert settings["questions"][0]["settings"]["type"] == "label_selection"
    assert {f["name"] for f in settings["fields"]} >= {"context", "violation", "control", "continuation"}
    assert json.loads((out / "injected" / ".argilla" / "dataset.json").read_text())["name"]
    records = json.loads((out / "injected" / "records.json").read_text())
    first, second = records[0], records[1]
    assert first["id"] == first["metadata"]["item_key"]
    # what Argilla's to_disk writes after annotation: nested responses per question
    answers = GOOD["injected"]
    first["responses"] = {
        **{q: [{"value": v, "user_id": "u-1111", "status": "submitted"}] for q, v in answers.items()},
        "note": [{"value": "fine", "user_id": "u-1111", "status": "submitted"}],
    }
    second["responses"] = {q: [{"value": "no", "user_id": "u-2222", "status": "draft"}] for q in answers}
    (out / "injected" / "records.json").write_text(json.dumps(records))
    # and a flattened export (records.to_list(flatten=True)) as JSON lines
    flat = {
        "id": second["id"],
        **{f"{q}.responses": ["no"] for q in answers},
        **{f"{q}.responses.users": ["u-3333"] for q in answers},
        **{f"{q}.responses.status": ["submitted"] for q in answers},
    }
    flat_path = workdir / "argilla_flat.jsonl"
    flat_path.write_text(json.dumps(flat) + "\n")

    r1 = run_cli(workdir, "audit", "import", str(dataset), str(out), "--db", str(db), "--format", "argilla")
    assert "imported 1 judgements" in r1.stdout
    r2 = run_cli(
        workdir, "audit", "import", str(dataset), str(flat_path), "--db", str(db), "--format", "argilla"
    )
    assert "imported 1 judgements" in r2.stdout
    r3 = run_cli(workdir, "audit", "import", str(dataset), str(out), "--db", str(db), "--format", "argilla")
    assert "imported 0 judgements (1 unchanged" in r3.stdout

    from bsafe_data.audit.store import AuditStore

    got = {j["annotator"]: j for j in AuditStore(db).judgements()}
    assert set(got) == {"argilla:u-1111", "argilla:u-3333"}
    assert got["argilla:u-1111"]["answers"] == answers and got["argilla:u-1111"]["note"] == "fine"
    assert got["argilla:u-3333"]["answers"] == {q: "no" for q in answers}
    assert got["argilla:u-3333"]["source"] == "argilla"
    assert got["argilla:u-1111"]["row_id"] == first["metadata"]["row_id"]


def test_label_studio_export_and_import(workdir, dataset):
    db = _fresh_db(workdir, dataset, "ls", "--n", "12", "--seed", "2")
    out = workdir / "ls_out"
    run_cli(
        workdir,
        "audit",
        "export",
        str(dataset),
        "--db",
        str(db),
        "--format",
        "label-studio",
        "--out",
        str(out),
    )
    config = ET.parse(out / "injected" / "label_config.xml").getroot()
    assert config.tag == "View"
    choices = {c.get("name"): [x.get("value") for x in c] for c in config.iter("Choices")}
    assert choices["violation_real"] == ["yes", "no", "unsure"] and len(choices) == 5
    text_names = {t.get("name") for t in config.iter("Text")}
    for c in config.iter("Choices"):
        assert c.get("toName") in text_names
    tasks = json.loads((out / "injected" / "tasks.json").read_text())
    assert all(t["data"]["item_key"] for t in tasks)
    assert all(
        f"${n}" in {t.get("value") for t in config.iter("Text")} for n in tasks[0]["data"] if n in text_names
    )

    answers = GOOD["injected"]
    exported = []
    for n, task in enumerate(tasks[:3]):
        result = [
            {
                "from_name": q,
                "to_name": "violation",
                "type": "choices",
                "value": {"choices": [v if n else "no"]},
            }
            for q, v in answers.items()
        ]
        result.append(
            {"from_name": "note", "to_name": "violation", "type": "textarea", "value": {"text": ["hm"]}}
        )
        exported.append(
            {
                "id": 100 + n,
                "data": task["data"],
                "annotations": [
                    {
                        "id": 1,
                        "completed_by": 7 if n != 2 else {"id": 8, "email": "lead@example.org"},
                        "result": result,
                        "was_cancelled": n == 1,
                        "created_at": "2026-01-02T03:04:05.000000Z",
                    }
                ],
            }
        )
    (workdir / "ls_export.json").write_text(json.dumps(exported))
    minimal = [{"id": 200, **tasks[3]["data"], "annotator": 9, "annotation_id": 5, **answers, "note": "min"}]
    (workdir / "ls_min.json").write_text(json.dumps(minimal))
    r1 = run_cli(
        workdir,
        "audit",
        "import",
        str(dataset),
        str(workdir / "ls_export.json"),
        "--db",
        str(db),
        "--format",
        "label-studio",
    )
    assert "imported 3 judgements" in r1.stdout
    run_cli(
        workdir,
        "audit",
        "import",
        str(dataset),
        str(workdir / "ls_min.json"),
        "--db",
        str(db),
        "--format",
        "label-studio",
    )
    from bsafe_data.audit.store import AuditStore

    js = AuditStore(db).judgements()
    by_row = {(j["row_id"], j["annotator"]): j for j in js}
    rid = [t["data"]["row_id"] for t in tasks[:4]]
    assert by_row[(rid[0], "label-studio:7")]["answers"] == {q: "no" for q in answers}
    assert by_row[(rid[0], "label-studio:7")]["note"] == "hm"
    assert by_row[(rid[1], "label-studio:7")]["skipped"] is True
    assert by_row[(rid[2], "label-studio:lead@example.org")]["answers"] == answers
    assert by_row[(rid[2], "label-studio:lead@example.org")]["created_at"].startswith("2026-01-02")
    assert by_row[(rid[3], "label-studio:9")]["answers"] == answers
    assert by_row[(rid[3], "label-studio:9")]["note"] == "min"


# -- packaging -------------------------------------------------------------------------------


def test_static_assets_ship_with_the_package():
    from importlib import resources

    static = resources.files("bsafe_data.audit").joinpath("static")
    html = static.joinpath("index.html").read_text()
    assert '<script src="/static/app.js"' in html
    assert "http://" not in html and "https://" not in html  # no CDN, nothing remote
    js = static.joinpath("app.js").read_text()
    assert "innerHTML" not in js.replace("never innerHTML", "")
    assert "https://" not in js and "http://" not in js
    py = (REPO / "pyproject.toml").read_text()
    assert '"audit/static/**/*"' in py


def test_install_browser_script_is_idempotent_and_exits_zero(tmp_path):
    script = REPO / "tests" / "install_browser.sh"
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("chromium missing: the script would try apt-get here")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "present" in proc.stdout


def test_manifest_hash_is_sha256_of_manifest(dataset):
    from bsafe_data.audit.folder import manifest_sha256

    assert manifest_sha256(dataset) == hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()


def test_store_is_wal(workdir, dataset):
    db = _fresh_db(workdir, dataset, "wal", "--n", "3")
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
