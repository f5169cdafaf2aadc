"""Batch mode: whole builds through the Batch API of the local test server (``/v1/files``,
``/v1/batches``), whose batch executor answers each line exactly as its chat endpoint would.

Each build runs the real CLI against the server on 127.0.0.1 and is compared byte for byte with an
online build of the same corpus; faults (expired lines, failed batches, refused uploads, cancels,
SIGKILL while polling) end without a traceback, with one message, and a re-run loses nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_server import ServerProcess  # noqa: E402

from tests.conftest import REPO  # noqa: E402

CLI = str(Path(sys.executable).with_name("bsafe-data"))
SERVER = str(Path(__file__).resolve().parent / "openai_server.py")
FLAGSHIP = str(REPO / "recipes" / "bsafe_plus.yaml")
KEY = "sk-batch-secret-9090"
ANSWER = (
    "Start by choosing a place within three hours of home. Book somewhere to sleep early. "
    "Pack light and check the weather the night before. Leave one afternoon unplanned."
)
BATCH = ("--set", "generator.mode=batch", "--set", "batch.poll_interval_s=0.1")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(model="gen-model", api_key=KEY) as srv:
        yield srv


def write_corpus(path: Path, n: int) -> Path:
    with path.open("w") as handle:
        for i in range(n):
            row = {"id": f"t{i}", "prompt": f"How should I plan a weekend trip, part {i}?", "response": ANSWER}
            handle.write(json.dumps(row) + "\n")
    return path


def args(server: ServerProcess, corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        CLI, "build", FLAGSHIP, "--out", str(out), "--source", str(corpus), "--cache-dir", str(cache),
        "--set", "generator.provider=openai", "--set", "generator.model=gen-model",
        "--set", f"generator.base_url={server.url}", "--set", "generator.api_key_env=BSAFE_BATCH_KEY",
        "--set", "generator.timeout_s=5", "--set", "generator.max_retries=2",
        "--set", "sampling.variants_per_answer=1", "--set", "sampling.clean_fraction=0.2", *extra,
    ]  # fmt: skip


def build(server: ServerProcess, corpus: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BSAFE_BATCH_KEY": KEY}
    proc = subprocess.run(args(server, corpus, out, cache, *extra), env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert KEY not in proc.stdout + proc.stderr
    return proc


def cli(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLI, *argv], env={**os.environ, "BSAFE_BATCH_KEY": KEY}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc


def parquet(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.glob("*/*.parquet"))}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def funnel(folder: Path) -> dict:
    found = manifest(folder)["funnel"]
    assert found["rows"] == found["kept"] + found["rejected"]
    assert sum(found["rejected_by_reason"].values()) == found["rejected"]
    return found


def batch_files(out: Path) -> list[Path]:
    return sorted((out.parent / f".{out.name}.bsafe-work" / "batches").glob("*.json"))


@pytest.fixture(scope="module")
def online(server, tmp_path_factory):
    """An online build of a 3,000-row corpus: (corpus, folder, chat requests it sent)."""
    tmp = tmp_path_factory.mktemp("online")
    corpus = write_corpus(tmp / "c.jsonl", 3000)
    server.reset()
    done = build(server, corpus, tmp / "online", tmp / "cache")
    assert done.returncode == 0, done.stderr
    sent = server.stats()["chat"]
    assert sent > 2000
    return corpus, tmp / "online", sent


def test_a_batch_build_sends_no_chat_request_and_writes_the_online_bytes(server, online, tmp_path):
    corpus, reference, online_requests = online
    server.reset()
    started = time.monotonic()
    done = build(server, corpus, tmp_path / "out", tmp_path / "cache", *BATCH)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    stats = server.stats()
    assert stats["chat"] == 0  # not one chat-completion request
    assert stats["uploads"] == stats["batches"] == 1  # one file: fewer than 50,000 requests
    assert stats["batch_lines"] == online_requests  # the same requests, answered by the batch
    assert parquet(tmp_path / "out") == parquet(reference)
    assert funnel(tmp_path / "out") == funnel(reference)
    assert manifest(tmp_path / "out")["usage"]["requests"] == online_requests
    print(f"online {online_requests} chat requests; batch 0 chat requests, 1 file, {took:.1f} s")


def test_the_per_file_limit_splits_a_round_into_files(server, online, tmp_path):
    corpus, reference, online_requests = online
    server.reset()
    done = build(server, corpus, tmp_path / "out", tmp_path / "cache", *BATCH,
                 "--set", "batch.max_requests_per_file=1000")  # fmt: skip
    assert done.returncode == 0, done.stderr
    stats = server.stats()
    assert stats["chat"] == 0
    assert stats["uploads"] == stats["batches"] == -(-online_requests // 1000)
    assert all(size <= 1000 for size in stats["batch_sizes"]) and sum(stats["batch_sizes"]) == online_requests
    assert parquet(tmp_path / "out") == parquet(reference)
