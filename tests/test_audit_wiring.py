"""Annotator judgements wired into the data: `refilter --apply-audit`, the card's Audit section and the
pushed `audit` config.

Datasets are real builds (a Llama Guard served by tests/guard_server.py, whose request counter
proves refilter makes no model call; the flagship recipe through the CLI for the push), audit sets
are sampled with the real `bsafe-data audit sample`, judgements go through the store the server
uses, and the push goes to the local Hub server of tests/hub_server.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.test_audit_core import GOOD, _bad, _judge
from tests.test_push import _real_build, hub, hub_env, push, run_driver  # noqa: F401 (fixture)
from tests.test_refilter import funnel, guard_build, rows_of, run_cli, server  # noqa: F401 (fixtures)

REASON = "annotator_rejected"
REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("bsafe-data"))


def _sample(folder: Path, *args: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        [CLI, "audit", "sample", str(folder), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def _kept_items(folder: Path) -> list[dict]:
    from bsafe_data.audit.store import AuditStore

    return [i for i in AuditStore.for_folder(folder).items() if i["config"] == "default"]


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("_split",)}


def test_apply_audit_moves_exactly_the_rejected_rows_with_zero_model_calls(
    server,  # noqa: F811 (fixture)
    guard_build,  # noqa: F811 (fixture)
    tmp_path,
):
    from bsafe_data.audit.store import AuditStore

    _, built, _ = guard_build
    folder = tmp_path / "ds"
    shutil.copytree(built, folder)
    assert "## Audit" not in (folder / "README.md").read_text()  # no judgements: no section
    _sample(folder, "--n", "16", "--seed", "2", "--overlap", "0.5")
    store = AuditStore.for_folder(folder)
    k = _kept_items(folder)
    assert len(k) >= 4
    _judge(store, k[0], "a", _bad(k[0]["grp"]))  # 1/1 bad: rejected under both policies
    _judge(store, k[1], "a", _bad(k[1]["grp"]))  # 2/2 bad
    _judge(store, k[1], "b", _bad(k[1]["grp"]))
    _judge(store, k[2], "a", _bad(k[2]["grp"]))  # 1/2 bad: a tie keeps it under majority
    _judge(store, k[2], "b", GOOD[k[2]["grp"]])
    _judge(store, k[3], "a", GOOD[k[3]["grp"]])  # good: stays
    expected = {k[0]["row_id"], k[1]["row_id"]}
    before = rows_of(folder)
    old = funnel(folder)
    requests = server.requests()

    proc = run_cli("refilter", str(folder), "--apply-audit", "--audit-policy", "majority")
    assert proc.returncode == 0, proc.stderr
    assert server.requests() == requests, "refilter --apply-audit sent model requests"
    assert "2 row(s) rejected by annotators" in " ".join(proc.stdout.split())
    after = rows_of(folder)
    assert set(after) == set(before)
    moved = {rid for rid, row in after.items() if row["reasons"] and before[rid]["reasons"] is None}
    assert moved == expected
    for rid in expected:
        assert after[rid]["reasons"] == [REASON]
        assert after[rid]["detail"].startswith(("1/1 annotators judged", "2/2 annotators judged"))
        moved_row = {k2: v for k2, v in after[rid].items() if k2 not in ("_split", "reasons", "detail")}
        kept_row = {k2: v for k2, v in before[rid].items() if k2 not in ("_split", "reasons", "detail")}
        assert moved_row == kept_row  # the row itself is unchanged, only its config
    for rid in set(before) - expected:
        assert _strip(after[rid]) == _strip(before[rid]) and after[rid]["_split"] == before[rid]["_split"]
    new = funnel(folder)
    assert new["kept"] == old["kept"] - 2 and new["rejected"] == old["rejected"] + 2
    assert new["rejected_by_reason"][REASON] == 2
    assert sum(new["rejected_by_reason"].values()) == new["rejected"]
    assert new["rows"] == new["kept"] + new["rejected"] == old["rows"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["refilter"]["audit"] == {"policy": "majority", "annotator_rejected": 2}
    assert manifest["refilter"]["classifier_requests"] == 0
    # the card of the rewritten folder carries the Audit section (the store lives on in DIR/.bsafe)
    card = (folder / "README.md").read_text()
    items = len(AuditStore.for_folder(folder).items())
    assert "## Audit" in card and f"6 judgement(s) of {items} sampled row(s) by 2 annotator(s)" in " ".join(
        card.split()
    )
    assert "`annotator_rejected`" in card
    verify = run_cli("verify", str(folder))
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # a later refilter does not re-decide annotator rejections, and --apply-audit again moves nothing new
    again = run_cli("refilter", str(folder), "--set", "filters.classifiers.0.threshold=0.5")
    assert again.returncode == 0, again.stderr
    later = rows_of(folder)
    assert {rid for rid, row in later.items() if row["reasons"] == [REASON]} == expected
    assert server.requests() == requests
    # `any` now also rejects the 1/2 row
    proc = run_cli("refilter", str(folder), "--apply-audit")
    assert proc.returncode == 0, proc.stderr
    final = rows_of(folder)
    assert {rid for rid, row in final.items() if row["reasons"] == [REASON]} == expected | {k[2]["row_id"]}
    assert server.requests() == requests


def test_push_publishes_the_audit_config_with_pseudonymised_annotators(hub, tmp_path):  # noqa: F811
    from bsafe_data.audit.store import AuditStore

    env = hub_env(hub, tmp_path)
    folder = _real_build(tmp_path, env)
    _sample(folder, "--n", "10", "--seed", "1", env=env)
    store = AuditStore.for_folder(folder)
    items = store.items()
    _judge(store, items[0], "zoe.real-name", GOOD[items[0]["grp"]], note="private remark")
    _judge(store, items[1], "adam.other", _bad(items[1]["grp"]))
    _judge(store, items[1], "zoe.real-name", GOOD[items[1]["grp"]])
    # the next build of the folder writes the Audit section (the store is carried over from the target)
    assert "## Audit" not in (folder / "README.md").read_text()
    again = subprocess.run(
        [CLI, "build", str(REPO / "recipes" / "bsafe_plus.yaml"), "--out", str(folder), "--limit", "24"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 judgement(s) of 10 sampled row(s) by 2 annotator(s)" in " ".join(
        (folder / "README.md").read_text().split()
    )
    files_before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    result = push(env, folder, "0.1.0", repo="org/audited")
    assert "audit/train-00000-of-00001.parquet" in [p for p, _ in result["files"]]
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == files_before
    loaded, _ = run_driver(
        env, "load", {"repo_id": "org/audited", "revisions": ["v0.1.0"], "configs": ["audit", "default"]}
    )
    rows = loaded["v0.1.0"]["audit"]["train"]
    assert len(rows) == 3
    assert {r["annotator"] for r in rows} == {"annotator_1", "annotator_2"}
    assert [r["annotator"] for r in rows if r["row_id"] == items[0]["row_id"]] == ["annotator_1"]
    text = json.dumps(rows)
    assert "zoe" not in text and "adam" not in text and "private remark" not in text
    assert {r["row_id"] for r in rows} == {items[0]["row_id"], items[1]["row_id"]}
    assert {r["verdict"] for r in rows if r["annotator"] == "annotator_2"} == {"bad"}
    assert sum(len(v) for v in loaded["v0.1.0"]["default"].values()) > 0
    # the shard is the judgements' parquet: the same rows read back locally
    local = pq.read_table(folder / "data" / "train-00000-of-00001.parquet").num_rows
    assert len(loaded["v0.1.0"]["default"]["train"]) == local
