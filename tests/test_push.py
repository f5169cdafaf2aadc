"""`bsafe-data push`: versioned, atomic releases against a Hub-compatible test server.

Real ``huggingface_hub`` and ``datasets`` talk HTTP to ``tests/hub_server.py``. Pushes and loads run
in subprocesses so ``HF_ENDPOINT`` is read fresh (conftest sets HF_HUB_OFFLINE for this process).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bsafe_data.publish import PublishError, changelog, push_dataset
from bsafe_data.publish import push as push_module
from tests.hub_server import HubServer
from tests.publish_fixtures import RECIPE_TEXT, build_dataset_folder, default_rows

REPO_ROOT = Path(__file__).parent.parent
DRIVER = Path(__file__).parent / "publish_fixtures.py"
TOKEN = "hf_test_write_token_7c1d9e"  # distinctive, so we can check it never leaks
BAD_TOKEN = "hf_revoked_token_0000"
READ_TOKEN = "hf_read_only_token_1111"
CLI = (
    "import typer; from bsafe_data.publish.cli import push_command; "
    "app = typer.Typer(pretty_exceptions_enable=False); app.command()(push_command); app()"
)
WRITE_ROUTES = ("create", "settings", "preupload", "lfs-batch", "lfs-upload", "lfs-verify", "commit", "tag")


@pytest.fixture
def hub():
    with HubServer(bad_tokens={BAD_TOKEN}, read_only_tokens={READ_TOKEN}) as server:
        yield server


def hub_env(hub: HubServer, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_DATASETS_CACHE=str(tmp_path / "hf_home" / "datasets"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(REPO_ROOT),
        NO_COLOR="1",
        COLUMNS="200",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_driver(
    env: dict[str, str], command: str, payload: dict[str, Any], timeout: float = 60
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    proc = subprocess.run(
        [sys.executable, str(DRIVER), command, json.dumps(payload, default=str)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"driver {command} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :]), proc


def push(
    env: dict[str, str], folder: Path, version: str, repo: str = "org/safety", **kwargs: Any
) -> dict[str, Any]:
    result, proc = run_driver(
        env, "push", {"folder": folder, "repo_id": repo, "version": version, "backoff_s": 0.01, **kwargs}
    )
    assert TOKEN not in proc.stdout + proc.stderr
    return result


def load(env: dict[str, str], revisions: list[str], repo: str = "org/safety") -> dict[str, Any]:
    result, _ = run_driver(
        env, "load", {"repo_id": repo, "revisions": revisions, "configs": ["default", "rejected"]}
    )
    return result


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-c", CLI, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert TOKEN not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def writes_since(hub: HubServer, start: int) -> list[dict[str, Any]]:
    return [e for e in hub.log[start:] if e["route"] in WRITE_ROUTES]


def changelog_data(card: str) -> list[dict[str, Any]]:
    start = card.index("<!-- changelog:data\n") + len("<!-- changelog:data\n")
    return [json.loads(line) for line in card[start : card.index("-->", start)].splitlines()]


# ------------------------------------------------------------------------------------------------
def test_round_trip_one_commit_one_tag(hub, tmp_path):
    rows = default_rows("a")
    folder = build_dataset_folder(tmp_path / "ds", rows)
    env = hub_env(hub, tmp_path)

    proc = run_cli(env, str(folder), "--repo", "org/safety", "--version", "1.0.0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("/datasets/org/safety/tree/v1.0.0")

    repo = hub.repo("org/safety")
    assert hub.commit_count("org/safety") == 1
    assert hub.count("commit", method="POST") == 1
    sha = repo.tags["v1.0.0"][0]
    assert sha == repo.branches["main"]
    assert sha in repo.tags["v1.0.0"][1]  # the tag message records the commit sha
    files = hub.files("org/safety", "v1.0.0")
    assert set(files) >= {
        "README.md",
        "manifest.json",
        "recipe.yaml",
        "plots/positions.png",
        "data/train-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
        "rejected/train-00000-of-00001.parquet",
    }
    assert all(TOKEN.encode() not in data for data in files.values())
    # parquet and png went through LFS, each uploaded once
    assert len(repo.lfs) == 4 and set(hub.lfs_puts.values()) == {1}

    loaded = load(env, ["v1.0.0"])["v1.0.0"]
    assert loaded == rows

    card = files["README.md"].decode()
    assert "| `v1.0.0` | this commit (parent" in card
    [entry] = changelog_data(card)
    assert entry["counts"] == {"default": {"train": 8, "test": 3}, "rejected": {"train": 4}}
    assert entry["recipe_sha256"] == json.loads((folder / "manifest.json").read_text())["recipe_sha256"]
    assert entry["parent"] == repo.commits[sha].parent


def test_existing_or_older_version_is_refused_without_changes(hub, tmp_path):
    folder = build_dataset_folder(tmp_path / "ds")
    env = hub_env(hub, tmp_path)
    first = push(env, folder, "1.0.0")
    assert first["tag"] == "v1.0.0"
    mark = len(hub.log)

    again = run_cli(env, str(folder), "--repo", "org/safety", "--version", "1.0.0")
    assert again.returncode == 2
    assert "v1.0.0 already exists" in again.stderr and first["commit_sha"][:12] in again.stderr
    older = run_cli(env, str(folder), "--repo", "org/safety", "--version", "0.9.0")
    assert older.returncode == 2 and "older than the latest release v1.0.0" in older.stderr

    assert hub.commit_count("org/safety") == 1
    # create_repo (exist_ok) is answered 409; nothing else is written
    assert [e["route"] for e in writes_since(hub, mark)] == ["create", "create"]
    assert all(e["status"] == 409 for e in writes_since(hub, mark))
    assert hub.repo("org/safety").branches["main"] == first["commit_sha"]


def test_second_version_keeps_both_releases_and_changelog(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    rows_a = default_rows("a")
    folder = build_dataset_folder(tmp_path / "ds", rows_a)
    v1 = push(env, folder, "1.0.0")

    rows_b = default_rows("b")
    rows_b["default"]["train"] = rows_b["default"]["train"][:6]
    build_dataset_folder(folder, rows_b, recipe_text=RECIPE_TEXT.replace("seed: 0", "seed: 1"), shards=2)
    v2 = push(env, folder, "1.1.0")

    assert hub.commit_count("org/safety") == 2  # one commit per release
    assert v2["parent_sha"] == v1["commit_sha"]
    # the one-shard files of v1 are deleted in v2's commit, so the train-* globs stay exact
    assert "data/train-00000-of-00001.parquet" in v2["deleted"]
    repo = hub.repo("org/safety")
    assert repo.tags["v1.0.0"][0] == v1["commit_sha"] and repo.tags["v1.1.0"][0] == v2["commit_sha"]

    loaded = load(env, ["v1.0.0", "v1.1.0"])
    assert loaded["v1.0.0"] == rows_a

    def by_id(splits: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        return {s: sorted(r, key=lambda row: row["id"]) for s, r in splits.items()}

    for config in ("default", "rejected"):  # two shards: compare as sets of rows
        assert by_id(loaded["v1.1.0"][config]) == by_id(rows_b[config])

    card = hub.files("org/safety", "main")["README.md"].decode()
    table = [line for line in card.splitlines() if line.startswith("| `v")]
    assert table[0].startswith("| `v1.1.0` | this commit (parent `" + v1["commit_sha"][:12])
    assert table[1].startswith("| `v1.0.0` | `" + v1["commit_sha"][:12] + "`")
    assert "default: train 6, test 3" in table[0] and "default: train 8, test 3" in table[1]
    data = changelog_data(card)
    assert [e["version"] for e in data] == ["1.1.0", "1.0.0"]
    assert data[1]["commit"] == v1["commit_sha"] and data[0]["commit"] is None
    assert data[0]["recipe_sha256"] != data[1]["recipe_sha256"]
    # the v1.0.0 card is untouched by the later release
    assert "v1.1.0" not in hub.files("org/safety", "v1.0.0")["README.md"].decode()


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "no Hugging Face token"), (BAD_TOKEN, "token was rejected"), (READ_TOKEN, "read-only")],
    ids=["missing", "rejected", "read-only"],
)
def test_token_problems_stop_before_any_upload(hub, tmp_path, token, message):
    folder = build_dataset_folder(tmp_path / "ds")
    env = hub_env(hub, tmp_path, token=token)
    proc = run_cli(env, str(folder), "--repo", "org/safety", "--version", "1.0.0")
    assert proc.returncode == 1
    assert message in proc.stderr
    assert writes_since(hub, 0) == []
    assert hub.state.repos == {}
    assert hub.count("whoami") == (0 if token is None else 1)
    for secret in (BAD_TOKEN, READ_TOKEN):
        assert secret not in proc.stdout + proc.stderr


def test_dry_run_uploads_nothing(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    folder = build_dataset_folder(tmp_path / "ds")

    new_repo = run_cli(env, str(folder), "--repo", "org/safety", "--version", "1.0.0", "--dry-run")
    assert new_repo.returncode == 0, new_repo.stderr
    assert "data/train-00000-of-00001.parquet" in new_repo.stderr
    assert "nothing was uploaded" in new_repo.stderr
    assert "+++ new/README.md" in new_repo.stderr
    assert writes_since(hub, 0) == [] and hub.state.repos == {}

    push(env, folder, "1.0.0")
    mark, puts = len(hub.log), hub.lfs_puts
    build_dataset_folder(folder, default_rows("b"))
    dry = run_cli(env, str(folder), "--repo", "org/safety", "--version", "1.1.0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "--- hub/README.md@" in dry.stderr
    assert "+| `v1.1.0` | this commit" in dry.stderr
    assert writes_since(hub, mark) == []
    assert hub.commit_count() == 1 and hub.lfs_puts == puts and "v1.1.0" not in hub.repo("org/safety").tags


def test_interrupted_push_rerun_does_not_reupload_lfs(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    folder = build_dataset_folder(tmp_path / "ds")
    hub.hold("commit")  # the commit request hangs; we kill the push while it waits
    payload = {"folder": str(folder), "repo_id": "org/safety", "version": "1.0.0", "backoff_s": 0.01}
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), "push", json.dumps(payload)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while hub.count("commit") == 0:
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "push never reached the commit"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate()
    hub.release()

    puts = hub.lfs_puts
    assert len(puts) == 4 and set(puts.values()) == {1}  # all LFS objects were uploaded ...
    assert hub.commit_count() == 0  # ... but nothing was committed
    batches = hub.count("lfs-batch")

    result = push(env, folder, "1.0.0")
    assert result["tag"] == "v1.0.0"
    assert hub.count("lfs-batch") > batches  # the re-run asked the server ...
    assert hub.lfs_puts == puts  # ... and uploaded nothing again
    assert hub.commit_count() == 1


def test_commit_retries_when_branch_moves_or_server_errs(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    folder = build_dataset_folder(tmp_path / "ds")
    push(env, folder, "1.0.0")
    build_dataset_folder(folder, default_rows("b"))
    other: dict[str, str] = {}

    def concurrent_writer(repo: Any) -> None:
        other["sha"] = hub.commit_files("org/safety", {"NOTES.md": b"edited on the Hub meanwhile\n"})

    hub.fail("commit", status=503, times=1)  # attempt 1: server error
    hub.before_next_commit(concurrent_writer)  # attempt 2: the branch moved (412)
    puts = hub.lfs_puts
    result = push(env, folder, "1.1.0")

    assert result["attempts"] == 3
    assert [e["status"] for e in hub.log if e["route"] == "commit"] == [200, 503, 412, 200]
    assert hub.commit_count() == 2  # v1.0.0 and v1.1.0: the failed attempts created nothing
    assert result["parent_sha"] == other["sha"]
    files = hub.files("org/safety", "v1.1.0")
    assert files["NOTES.md"] == b"edited on the Hub meanwhile\n"
    new_objects = {oid: n for oid, n in hub.lfs_puts.items() if oid not in puts}
    assert new_objects and set(new_objects.values()) == {1}  # retries never re-uploaded


def test_failed_lfs_upload_is_retried_without_resending_the_others(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    folder = build_dataset_folder(tmp_path / "ds")
    hub.fail("lfs-upload", status=409, times=1)  # huggingface_hub wraps this one in a RuntimeError
    result = push(env, folder, "1.0.0")
    assert result["attempts"] == 2 and result["tag"] == "v1.0.0"
    assert hub.count("lfs-upload", status=409) == 1
    assert len(hub.lfs_puts) == 4 and set(hub.lfs_puts.values()) == {1}
    assert hub.commit_count() == 1


def test_tag_failure_then_rerun_tags_the_same_commit(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    folder = build_dataset_folder(tmp_path / "ds")
    hub.fail("tag", status=500, times=2)
    failed = push(env, folder, "1.0.0", max_attempts=2)
    assert failed["exit_code"] == 1 and "tagging it v1.0.0 failed" in failed["error"]
    assert hub.commit_count() == 1
    head = hub.repo("org/safety").branches["main"]

    result = push(env, folder, "1.0.0")
    assert hub.commit_count() == 1  # the re-run found everything in place: no second commit
    assert result["commit_sha"] == head and hub.repo("org/safety").tags["v1.0.0"][0] == head


def test_gated_private_and_pull_request(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    folder = build_dataset_folder(tmp_path / "ds")
    push(env, folder, "1.0.0", repo="org/gated", gated="manual", private=True)
    repo = hub.repo("org/gated")
    assert repo.gated == "manual" and repo.private
    routes = [e["route"] for e in hub.log if e["repo"] == "org/gated"]
    assert routes.index("settings") < routes.index("commit")  # gated before any data lands
    meta = yaml.safe_load(hub.files("org/gated", "v1.0.0")["README.md"].decode().split("---")[1])
    assert meta["extra_gated_prompt"] and meta["extra_gated_fields"]
    assert meta["configs"][0]["config_name"] == "default"

    push(env, folder, "1.0.0", repo="org/pr")
    build_dataset_folder(folder, default_rows("b"))
    main_before = hub.repo("org/pr").branches["main"]
    result = push(env, folder, "1.1.0", repo="org/pr", create_pr=True)
    pr_repo = hub.repo("org/pr")
    assert result["pr_url"].endswith("/datasets/org/pr/discussions/1") and result["tag"] is None
    assert pr_repo.branches["main"] == main_before and "v1.1.0" not in pr_repo.tags
    assert pr_repo.prs[1] == result["commit_sha"]
    assert "this pull request" in hub.files("org/pr", "refs/pr/1")["README.md"].decode()


# -- local checks (no network) -------------------------------------------------------------------
def test_bad_version_and_oversized_shard_fail_before_network(tmp_path, monkeypatch):
    folder = build_dataset_folder(tmp_path / "ds")
    unreachable = "http://127.0.0.1:9"
    with pytest.raises(PublishError, match="not a semantic version") as err:
        push_dataset(folder, "org/x", "1.0", token="t", endpoint=unreachable)
    assert err.value.exit_code == 2
    monkeypatch.setattr(push_module, "MAX_SHARD_BYTES", 1000)
    with pytest.raises(PublishError, match="larger than 1.0 kB") as err:
        push_dataset(folder, "org/x", "1.0.0", token="t", endpoint=unreachable)
    assert err.value.exit_code == 2
    (folder / "manifest.json").unlink()
    with pytest.raises(PublishError, match="no manifest.json"):
        push_dataset(folder, "org/x", "1.0.0", token="t", endpoint=unreachable)


def test_changelog_merge_keeps_history_with_tag_shas():
    old_entry = changelog.ChangelogEntry(
        "1.0.0", "2025-01-01", {"default": {"train": 2}}, "ab" * 32, parent="0" * 40
    )
    old_card = (
        "# x\n<!-- changelog:start -->"
        + changelog.render_changelog([old_entry], "1.0.0")
        + "<!-- changelog:end -->\n"
    )
    new = changelog.ChangelogEntry(
        "1.2.0", "2025-02-01", {"default": {"train": 3}}, "cd" * 32, parent="1" * 40
    )
    tags = {"v1.0.0": "2" * 40, "v1.1.0": "3" * 40, "not-a-release": "4" * 40}
    card = changelog.build_card(
        "# x\n\n<!-- changelog:start -->\n<!-- changelog:end -->\n",
        gated="none",
        old_card=old_card,
        entry=new,
        tags=tags,
    )
    entries, _ = changelog.read_changelog(card)
    assert [e.version for e in entries] == ["1.2.0", "1.1.0", "1.0.0"]
    assert entries[2].commit == "2" * 40 and entries[2].date == "2025-01-01"  # sha from the tag
    assert entries[1].commit == "3" * 40 and entries[1].note == "not recorded"
    assert card.count("<!-- changelog:start -->") == 1
    # rows of a hand-written changelog (no machine data) are kept below the new ones
    legacy = "<!-- changelog:start -->\n| version | sha |\n|---|---|\n| 0.1 | abc |\n<!-- changelog:end -->"
    kept = changelog.build_card(legacy, gated="none", old_card=legacy, entry=new, tags={})
    assert kept.index("| `v1.2.0` |") < kept.index("| 0.1 | abc |")
    # a card without the markers gets a changelog section appended
    assert "## Changelog" in changelog.build_card("# y\n", gated="none", old_card=None, entry=new, tags={})


API_CHECK = """
import hashlib
import json
from huggingface_hub import HfApi, HfFileSystem, get_hf_file_metadata, hf_hub_download, hf_hub_url
api, repo, rev = HfApi(), "org/safety", "v1.0.0"
kw = {"repo_type": "dataset", "revision": rev}
shard = "data/train-00000-of-00001.parquet"
meta = get_hf_file_metadata(hf_hub_url(repo, shard, repo_type="dataset", revision=rev))
with HfFileSystem().open(f"datasets/{repo}@{rev}/{shard}", "rb", block_size=16) as f:
    f.seek(4)
    chunk = f.read(8)
print(json.dumps({
    "tree": sorted(f.path for f in api.list_repo_tree(repo, recursive=True, **kw)),
    "top": sorted(f.path for f in api.list_repo_tree(repo, **kw)),
    "paths": [type(i).__name__ + ":" + i.path
              for i in api.get_paths_info(repo, ["README.md", "data", "nope"], **kw)],
    "meta": [meta.etag, meta.size, meta.commit_hash], "chunk": chunk.hex(),
    "manifest": open(hf_hub_download(repo, "manifest.json", **kw)).read(),
    "commits": [c.title for c in api.list_repo_commits(repo, repo_type="dataset")],
    "lfs": sorted(s.rfilename for s in api.dataset_info(repo, revision=rev, files_metadata=True).siblings
                  if s.lfs),
}))
"""


def test_hub_server_speaks_the_client_api(hub, tmp_path):
    """Tree, paths-info, HEAD metadata, ranged reads, downloads, commits, LFS siblings: the real client."""
    env = hub_env(hub, tmp_path)
    folder = build_dataset_folder(tmp_path / "ds")
    result = push(env, folder, "1.0.0")
    proc = subprocess.run(
        [sys.executable, "-c", API_CHECK], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    shard = (folder / "data/train-00000-of-00001.parquet").read_bytes()
    assert got["top"] == [
        ".gitattributes",
        "README.md",
        "data",
        "manifest.json",
        "plots",
        "recipe.yaml",
        "rejected",
    ]
    assert "data/train-00000-of-00001.parquet" in got["tree"] and "data" in got["tree"]
    assert got["paths"] == ["RepoFile:README.md", "RepoFolder:data"]
    assert got["meta"] == [hashlib.sha256(shard).hexdigest(), len(shard), result["commit_sha"]]
    assert bytes.fromhex(got["chunk"]) == shard[4:12] and hub.count("resolve", status=206) >= 1
    assert got["manifest"] == (folder / "manifest.json").read_text()
    assert got["commits"] == ["Release v1.0.0", "initial commit"]
    assert got["lfs"] == sorted(p for p in result_files(result) if p.endswith((".parquet", ".png")))


def result_files(result: dict[str, Any]) -> list[str]:
    return [path for path, _ in result["files"]]


def test_real_build_with_push_round_trips(hub, tmp_path):
    """`bsafe-data build --push` publishes a real build; the tag loads the same rows as the folder."""
    from datasets import load_dataset

    env = hub_env(hub, tmp_path)
    out = tmp_path / "real"
    cli = str(Path(sys.executable).with_name("bsafe-data"))
    proc = subprocess.run(
        [cli, "build", str(REPO_ROOT / "recipes" / "bsafe_plus.yaml"), "--out", str(out), "--limit", "24",
         "--push", "--set", "publish.repo=org/real", "--set", "publish.version=0.1.0"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "published org/real v0.1.0" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr
    assert hub.commit_count("org/real") == 1
    remote = load(env, ["v0.1.0"], repo="org/real")["v0.1.0"]
    for config in ("default", "rejected"):
        local = load_dataset(str(out), config)
        expected = {split: json.loads(json.dumps(local[split].to_list(), default=str)) for split in local}
        assert remote[config] == expected, config
    assert sum(len(v) for v in remote["default"].values()) > 0


def _real_build(tmp_path: Path, env: dict[str, str], limit: str = "24") -> Path:
    out = tmp_path / "real"
    cli = str(Path(sys.executable).with_name("bsafe-data"))
    proc = subprocess.run(
        [cli, "build", str(REPO_ROOT / "recipes" / "bsafe_plus.yaml"), "--out", str(out), "--limit", limit],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_tampered_or_foreign_folders_are_refused_before_any_upload(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    out = _real_build(tmp_path, env)
    start = len(hub.log)
    (out / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    stray = run_cli(env, str(out), "--repo", "org/t", "--version", "1.0.0")
    assert stray.returncode == 2 and "undeclared file id_rsa" in stray.stderr
    assert "Nothing was uploaded" in stray.stderr
    (out / "id_rsa").unlink()
    shard = next((out / "data").glob("train-*.parquet"))
    shard.write_bytes(shard.read_bytes() + b"\0")
    edited = run_cli(env, str(out), "--repo", "org/t", "--version", "1.0.0")
    assert edited.returncode == 2 and "changed since the build" in edited.stderr
    (out / "data" / "train-00000-of-00001.parquet.tmp").write_bytes(b"leftover")
    assert run_cli(env, str(out), "--repo", "org/t", "--version", "1.0.0").returncode == 2
    not_ours = tmp_path / "plain"
    not_ours.mkdir()
    (not_ours / "README.md").write_text("# hello")
    (not_ours / "manifest.json").write_text("{}")
    foreign = run_cli(env, str(not_ours), "--repo", "org/t", "--version", "1.0.0")
    assert foreign.returncode == 2 and "not written by bsafe-data" in foreign.stderr
    assert writes_since(hub, start) == [] and hub.commit_count() == 0


def test_sigkill_during_push_then_rerun_makes_one_commit_and_one_tag(hub, tmp_path):
    """Kill the push at random points; the re-run publishes exactly one commit and one tag."""
    import random

    env = hub_env(hub, tmp_path)
    out = _real_build(tmp_path, env, limit="60")
    args = [sys.executable, "-c", CLI, str(out), "--repo", "org/k", "--version", "1.0.0"]
    rng = random.Random(11)
    for _ in range(5):
        proc = subprocess.Popen(
            args, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.2, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert hub.commit_count() <= 1
    final = run_cli(env, str(out), "--repo", "org/k", "--version", "1.0.0")
    if hub.commit_count("org/k") == 1 and final.returncode != 0:
        # a killed run got as far as the commit and the tag: the release exists, once
        assert "already exists" in final.stderr
    else:
        assert final.returncode == 0, final.stderr
    assert hub.commit_count("org/k") == 1
    repo = hub.repo("org/k")
    assert list(repo.tags) == ["v1.0.0"]
    files = set(hub.files("org/k", "v1.0.0")) - {".gitattributes"}  # the Hub's own, from repo creation
    declared = json.loads((out / "manifest.json").read_text())["files"]
    assert files == {*declared, "manifest.json"}  # exactly the declared files, nothing of .bsafe/
