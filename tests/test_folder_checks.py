"""A dataset folder is checked before every command reads it; no output goes inside it.

One small flagship build (``--limit``) is copied per case and made hostile: an edited or deleted
shard, a shard of another schema under a re-hashed manifest, a manifest with fields of the wrong
type, a link leaving the folder, a user's own file. Every reading command (``show``, ``stats``,
``refilter``, ``rerender``, ``audit …``, ``push``) runs as the real CLI and must refuse with exit 2
and one line naming the problem, print no traceback and leave every byte of the folder (and no
work folder beside it); ``verify`` lists the problems with exit 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bsafe_data.integrity import file_entries
from tests.conftest import REPO

CLI = str(Path(sys.executable).with_name("bsafe-data"))
SHARD = "data/train-00000-of-00001.parquet"
METHOD = "bsafe_plus"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80", "HF_TOKEN": "hf_never_used"}  # 80: a long message would wrap
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, env=env)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checks") / "ds"
    recipe = str(REPO / "recipes" / "bsafe_plus.yaml")
    proc = cli("build", recipe, "--out", str(out), "--limit", "12", "--set", "tokenizers.extra=[]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy(built: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ds"
    shutil.copytree(built, folder, symlinks=True)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of the folder (hidden state too) and what lies beside it."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files["<beside>"] = "\n".join(sorted(p.name for p in folder.parent.iterdir())).encode()
    return files


def rehash(folder: Path) -> None:
    """What a hostile sender does: the manifest's hashes rewritten to match the edited files."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_entries(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def refused(proc: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2, the reason on one line of stderr."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def reading_commands(folder: Path, tmp_path: Path) -> list[tuple[str, ...]]:
    """Every command that reads a dataset folder (outputs outside it)."""
    return [
        ("show", str(folder)),
        ("stats", str(folder), "--plots", str(tmp_path / "plots")),
        ("refilter", str(folder), "--set", "filters.classifiers.0.threshold=0.9"),
        ("rerender", str(folder), "--tokenizer", "builtin:phi-3-mini", "--out", str(tmp_path / "phi")),
        ("audit", "sample", str(folder), "--n", "4"),
        ("audit", "report", str(folder)),
        ("audit", "export", str(folder), "--format", "argilla", "--out", str(tmp_path / "argilla")),
        ("push", str(folder), "--repo", "org/name", "--version", "1.0.0"),
    ]


def test_an_edited_kept_shard_is_refused_by_every_reading_command(built, tmp_path):
    folder = copy(built, tmp_path)
    shard = folder / SHARD
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    before = snapshot(folder)
    for command in reading_commands(folder, tmp_path)[:5] + reading_commands(folder, tmp_path)[-1:]:
        refused(cli(*command), f"{SHARD} changed since the build")
        assert snapshot(folder) == before, command
    assert not (tmp_path / "phi").exists() and not (tmp_path / "plots").exists()
    assert cli("verify", str(folder)).returncode == 1  # nothing laundered


def test_a_deleted_shard_is_refused(built, tmp_path):
    folder = copy(built, tmp_path)
    (folder / "rejected" / "train-00000-of-00001.parquet").unlink()
    before = snapshot(folder)
    for command in reading_commands(folder, tmp_path)[:3]:
        refused(cli(*command), "missing file rejected/train-00000-of-00001.parquet")
    assert snapshot(folder) == before


def test_a_shard_of_another_schema_under_a_rehashed_manifest_is_refused_cleanly(built, tmp_path):
    folder = copy(built, tmp_path)
    table = pq.read_table(folder / SHARD)
    scores = table.schema.get_field_index("scores")
    pq.write_table(table.set_column(scores, "scores", pa.array(["high"] * table.num_rows)), folder / SHARD)
    rehash(folder)
    before = snapshot(folder)
    for command in reading_commands(folder, tmp_path):
        refused(
            cli(*command), f"{SHARD} does not have the columns of a bsafe_plus dataset: other types: scores"
        )
    assert snapshot(folder) == before
    check = cli("verify", str(folder))
    assert check.returncode == 1 and "other types: scores" in check.stderr


def test_a_malformed_manifest_is_a_list_of_problems(built, tmp_path):
    folder = copy(built, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["funnel"]["kept"] = "96"
    manifest["counts"] = ["default"]
    manifest["files"][SHARD]["bytes"] = None
    manifest["tokenizers"] = "builtin:qwen2.5"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    check = cli("verify", str(folder))
    assert check.returncode == 1
    for field in ("funnel.kept", "counts", f"files.{SHARD}.bytes", "tokenizers"):
        assert f"manifest.json: {field}: Input should be" in check.stderr, (field, check.stderr)
    refused(cli("stats", str(folder)), "manifest.json: tokenizers: Input should be a valid dictionary")
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = manifest["files"].pop("README.md")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    check = cli("verify", str(folder))
    assert check.returncode == 1 and "declares '../outside.txt': not a plain path" in check.stderr
    (folder / "manifest.json").write_text("[1, 2]")
    assert "was not written by bsafe-data" in cli("verify", str(folder)).stderr


def test_a_link_leaving_the_folder_fails_verify_and_push_refuses_it(built, tmp_path):
    folder = copy(built, tmp_path)
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (folder / "plots" / "positions.png").unlink()
    (folder / "plots" / "positions.png").symlink_to(secret)
    (folder / "data" / "more").symlink_to(tmp_path, target_is_directory=True)
    rehash(folder)  # the link is declared, with the hash of the file it points to
    check = cli("verify", str(folder))
    assert check.returncode == 1
    assert "plots/positions.png is a link leaving the folder" in check.stderr
    assert "data/more is a link leaving the folder" in check.stderr
    push = cli("push", str(folder), "--repo", "org/name", "--version", "1.0.0", "--dry-run")
    refused(push, "plots/positions.png is a link leaving the folder")
    assert "Nothing was uploaded" in push.stderr and "BEGIN OPENSSH" not in push.stdout + push.stderr


def test_outputs_inside_the_input_folder_are_refused(built, tmp_path):
    folder = copy(built, tmp_path)
    (tmp_path / "plots.png").write_bytes(b"mine")
    before = snapshot(folder)
    phi = ("--tokenizer", "builtin:phi-3-mini")
    refused(cli("rerender", str(folder), *phi, "--out", str(folder / "sub")), "is inside the dataset folder")
    refused(cli("rerender", str(folder), *phi, "--out", str(tmp_path)), "holds the dataset folder")
    refused(cli("stats", str(folder), "--plots", str(folder / "plots")), "is inside the dataset folder")
    refused(cli("stats", str(folder), "--plots", str(tmp_path / "plots.png")), "is a file")
    export = ("audit", "export", str(folder), "--format", "argilla")
    refused(cli(*export, "--out", str(folder / "argilla")), "is inside the dataset folder")
    assert snapshot(folder) == before and (tmp_path / "plots.png").read_bytes() == b"mine"
    assert cli("verify", str(folder)).returncode == 0


def test_refilter_refuses_a_folder_holding_a_users_own_file_and_keeps_it(built, tmp_path):
    folder = copy(built, tmp_path)
    (folder / "notes.txt").write_text("my own notes")
    (folder / "plots" / "mine\x1b]0;title\x07.png").write_bytes(b"png")  # a name is data, not a command
    before = snapshot(folder)
    proc = cli("refilter", str(folder), "--set", "filters.classifiers.0.threshold=0.9")
    refused(proc, "undeclared file notes.txt")
    assert "undeclared file plots/mine\\x1b]0;title\\x07.png" in proc.stderr and "\x1b" not in proc.stderr
    assert snapshot(folder) == before
