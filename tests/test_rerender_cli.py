"""`bsafe-data rerender DIR --tokenizer ID --out DIR2` writes a new verified folder; `--version`; flag help;
the manifest's tokenizer Hub ids.

The flagship recipe is built with the real CLI and re-rendered for the second bundled tokenizer family
(Phi-3-mini); the result is compared with the library's ``rerender`` on the same rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bsafe_data import __version__

REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("bsafe-data"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def rows(folder: Path, sub: str) -> dict[str, dict]:
    out = {}
    for path in sorted((folder / sub).glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            row["_split"] = path.name.split("-")[0]
            out[row["id"]] = row
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rerender") / "ds"
    proc = run_cli("build", str(REPO / "recipes" / "bsafe_plus.yaml"), "--out", str(out), "--limit", "30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_rerender_writes_a_verified_folder_for_the_other_tokenizer(built, tmp_path):
    from datasets import load_dataset

    from bsafe_data import rerender

    out = tmp_path / "phi"
    proc = run_cli("rerender", str(built), "--tokenizer", "builtin:phi-3-mini", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 model requests" in proc.stdout
    check = run_cli("verify", str(out))
    assert check.returncode == 0, check.stdout + check.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    source = json.loads((built / "manifest.json").read_text())
    assert manifest["tokenizers"]["primary"] == "builtin:phi-3-mini"
    assert manifest["tokenizers"]["hub_ids"]["builtin:phi-3-mini"] == "microsoft/Phi-3-mini-4k-instruct"
    assert manifest["tokenizers"]["hub_ids"]["builtin:qwen2.5"] == "Qwen/Qwen2.5-0.5B-Instruct"
    dropped = manifest["rerender"]["dropped"]
    assert manifest["rerender"]["model_requests"] == 0
    # rejected config: the same rows
    assert rows(out, "rejected") == rows(built, "rejected")
    # data: the source's kept rows minus the dropped ones, re-rendered exactly as the library does
    new, old = rows(out, "data"), rows(built, "data")
    assert set(new) <= set(old) and len(old) - len(new) == sum(dropped.values())
    assert manifest["funnel"]["kept"] == len(new) == source["funnel"]["kept"] - sum(dropped.values())
    expected = rerender(load_dataset(str(built)), "builtin:phi-3-mini").dataset
    by_id = {r["id"]: r for split in expected for r in expected[split].to_list()}
    assert set(by_id) == set(new)
    for rid, row in new.items():
        assert row["_split"] == old[rid]["_split"]
        assert row["prompt"] == by_id[rid]["prompt"] and row["completion"] == by_id[rid]["completion"]
        assert row["backtrack"] == by_id[rid]["backtrack"]
        assert row["response"] == old[rid]["response"] and row["injection"] == old[rid]["injection"]
        assert "<|user|>" in row["prompt"]  # Phi-3's chat template, not ChatML
        assert row["prompt"] != old[rid]["prompt"]
    atoms = set(manifest["control_tokens"])
    needed = {a for r in new.values() for s in r["segments"] if s["kind"] == "control" for a in [s["text"]]}
    assert needed and all(any(a in c for a in atoms) for c in needed)
    card = (out / "README.md").read_text()
    assert "microsoft/Phi-3-mini-4k-instruct" in card and f"**{manifest['funnel']['kept']}**" in card
    assert load_dataset(str(out))["train"].num_rows == manifest["counts"]["default"]["train"]


def test_rerender_refuses_a_foreign_folder_and_an_unverified_source(built, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = run_cli("rerender", str(built), "--tokenizer", "builtin:phi-3-mini", "--out", str(foreign))
    assert proc.returncode == 2 and "not made by bsafe-data" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(built, tampered)
    (tampered / "recipe.yaml").write_text((tampered / "recipe.yaml").read_text() + "\n# edited\n")
    proc = run_cli(
        "rerender", str(tampered), "--tokenizer", "builtin:phi-3-mini", "--out", str(tmp_path / "x")
    )
    assert proc.returncode == 2 and "does not verify" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_version_and_flag_help():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"bsafe-data {__version__}"
    for command in (["build"], ["refilter"], ["audit", "sample"], []):
        text = run_cli(*command, "--help").stdout
        assert "--help" in text and "<bool>" not in text, command
    assert "<path>" in run_cli("build", "--help").stdout  # value types of real options stay
