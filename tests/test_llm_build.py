"""Whole builds with `generator.provider: openai` against the local OpenAI-compatible test server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_server import ServerProcess  # noqa: E402

from tests.conftest import REPO, source_row_key  # noqa: E402
from tests.test_executors import parquet  # noqa: E402

CLI = str(Path(sys.executable).with_name("bsafe-data"))
FLAGSHIP = str(REPO / "recipes" / "bsafe_plus.yaml")
KEY = "sk-test-secret-4242"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(model="gen-model", api_key=KEY) as srv:
        yield srv


def write_corpus(path: Path, n: int, markers: dict[int, str] | None = None) -> Path:
    markers = markers or {}
    with path.open("w") as handle:
        for i in range(n):
            prompt = f"How should I plan a weekend trip, part {i}? {markers.get(i, '')}".strip()
            response = (
                "Start by choosing a place within three hours of home. Book somewhere to sleep early. "
                "Pack light and check the weather the night before. Leave one afternoon unplanned."
            )
            handle.write(json.dumps({"id": f"t{i}", "prompt": prompt, "response": response}) + "\n")
    return path


def build(server: ServerProcess, corpus: Path, out: Path, cache: Path, *extra: str, wait: bool = True):
    args = [
        CLI, "build", FLAGSHIP, "--out", str(out), "--source", str(corpus), "--cache-dir", str(cache),
        "--set", "generator.provider=openai", "--set", "generator.model=gen-model",
        "--set", f"generator.base_url={server.url}", "--set", "generator.api_key_env=BSAFE_TEST_KEY",
        "--set", "generator.timeout_s=2", "--set", "generator.max_retries=3",
        "--set", "sampling.variants_per_answer=1", "--set", "sampling.clean_fraction=0.2", *extra,
    ]  # fmt: skip
    env = {**os.environ, "BSAFE_TEST_KEY": KEY}
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert KEY not in proc.stdout + proc.stderr
    return proc


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_rerun_and_relabel_make_zero_requests(server, tmp_path):
    server.reset()
    corpus = write_corpus(tmp_path / "c.jsonl", 40)
    cache = tmp_path / "cache"
    first = build(server, corpus, tmp_path / "a", cache)
    assert first.returncode == 0, first.stderr
    sent = server.stats()["chat"]
    usage = manifest(tmp_path / "a")["usage"]
    assert sent > 0 and usage["requests"] == sent and usage["cache_hits"] == 0
    assert manifest(tmp_path / "a")["timings"]["waiting"] > 0  # for answers
    rows = load_dataset(str(tmp_path / "a"))["train"]
    assert any(r["kind"] == "injected" and r["generator"]["model"] == "gen-model" for r in rows)

    again = build(server, corpus, tmp_path / "b", cache)
    assert again.returncode == 0, again.stderr
    assert server.stats()["chat"] == sent  # the server's own counter: nothing new
    assert manifest(tmp_path / "b")["usage"]["cache_hits"] == usage["requests"]
    for rel in ("data/train-00000-of-00001.parquet", "rejected/train-00000-of-00001.parquet"):
        if (tmp_path / "a" / rel).exists():
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()

    relabel_args = (
        "--set",
        "control.format=<bt {x} {category}>",
        "--set",
        "filters.classifiers.0.threshold=0.9",
    )
    relabel = build(server, corpus, tmp_path / "c", cache, *relabel_args)
    assert relabel.returncode == 0, relabel.stderr
    assert server.stats()["chat"] == sent
    injected = [r for r in load_dataset(str(tmp_path / "c"))["train"] if r["kind"] == "injected"]
    assert injected and all(r["completion"].startswith("<bt ") for r in injected)


def test_faults_are_survived_and_the_funnel_adds_up(server, tmp_path):
    server.reset()
    markers = {
        1: "[[fault:429:2]]", 2: "[[fault:500:1]]", 3: "[[fault:malformed:1]]", 4: "[[fault:hang:1]]",
        5: "[[fault:refuse:0]]", 6: "[[fault:truncate:1]]", 7: "[[fault:503:0]]", 8: "[[fault:notags:0]]",
        9: "[[fault:drop:1]]", 10: "[[fault:ctxlen:0]]",
    }  # fmt: skip
    corpus = write_corpus(tmp_path / "c.jsonl", 24, markers)
    proc = build(server, corpus, tmp_path / "out", tmp_path / "cache", "--set", "sampling.clean_fraction=0")
    # the always-503 row is a transient failure: the dataset is written, the build says it is incomplete;
    # the prompt the endpoint refuses as too long is a final failure: a re-run would not change it
    assert proc.returncode == 3, proc.stderr
    assert "incomplete: 1 row(s)" in proc.stderr and "Traceback" not in proc.stderr
    m = manifest(tmp_path / "out")
    assert m["complete"] is False and m["transient_rows"] == 1
    funnel = m["funnel"]
    assert funnel["rows"] == 24 == funnel["kept"] + funnel["rejected"]
    rejected = load_dataset(str(tmp_path / "out"), "rejected")["train"]
    reasons = {source_row_key(r): r["reasons"][0] for r in rejected}
    assert reasons.get("t5/v0") == "generator_refused"
    assert reasons.get("t7/v0") == "generator_error"
    assert reasons.get("t10/v0") == "generator_error"
    assert reasons.get("t8/v0") == "generator_unparseable"
    kept = {source_row_key(r) for split in load_dataset(str(tmp_path / "out")).values() for r in split}
    for transient in ("t1/v0", "t2/v0", "t3/v0", "t4/v0", "t6/v0", "t9/v0"):
        assert transient in kept or reasons.get(transient) in {"violation_not_flagged", "context_flagged"}
    assert m["usage"]["retries"] >= 6


def test_fatal_endpoint_error_stops_early_without_traceback(server, tmp_path):
    server.reset()
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    proc = build(
        server, corpus, tmp_path / "out", tmp_path / "cache", "--set", "generator.api_key_env=NO_SUCH_KEY"
    )
    assert proc.returncode == 1
    assert "401" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_sigkill_mid_generation_then_resume(server, tmp_path):
    """Kill during generation; the re-run loses at most in-flight requests and duplicates no row."""
    server.reset(latency_s=0.02)
    corpus = write_corpus(tmp_path / "c.jsonl", 150)
    cache = tmp_path / "cache"
    extra = ("--set", "output.chunk_rows=30", "--set", "generator.max_concurrency=4")
    proc = build(server, corpus, tmp_path / "out", cache, *extra, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and server.stats()["chat"] < 60:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = server.stats()["chat"]
    assert 0 < before and not (tmp_path / "out" / "manifest.json").exists()
    resumed = build(server, corpus, tmp_path / "out", cache, *extra)
    assert resumed.returncode == 0, resumed.stderr
    after = server.stats()["chat"]
    assert after > before  # the rest was generated by the re-run
    ids, kinds = [], []
    for path in sorted((tmp_path / "out").glob("*/*.parquet")):
        table = pq.read_table(path, columns=["id", "kind"])
        ids += table.column("id").to_pylist()
        kinds += table.column("kind").to_pylist()
    assert len(ids) == len(set(ids)) == 150
    # answers received before the kill came from the cache: over both runs the server saw at most one
    # request per injected row, plus what was in flight (4) and the answers of the cache writer's last
    # commit window (50 ms at ~200 answers/s here, so about 10) when the process died
    injected = kinds.count("injected")
    assert injected > 100 and after <= injected + 4 + 12


def assert_within_rate(arrivals: list[float], per_minute: int) -> None:
    """Every stretch of arrivals holds at most the limit's rate over it plus one second's burst.

    The limiter's envelope (``llm/ratelimit.py``): fewer than ``per_minute / 60 * (w + 1) + 1``
    requests leave in any ``w`` seconds, so no 60 s window sees more than the limit; 50 ms of slack
    for when requests arrive. Workers that each used the whole limit would break it at once.
    """
    per_s = per_minute / 60
    for i, start in enumerate(arrivals):
        for j in range(i, len(arrivals)):
            assert j - i + 1 <= per_s * (arrivals[j] - start + 1.05) + 1, (i, j, arrivals[j] - start)


LIMITED = ("--set", "output.chunk_rows=10", "--set", "generator.requests_per_minute=600")


@pytest.fixture(scope="module")
def limited_local(server, tmp_path_factory):
    """A local LLM build of a 60-row corpus under a 600 rpm limit: (corpus, folder)."""
    tmp = tmp_path_factory.mktemp("limited")
    corpus = write_corpus(tmp / "c.jsonl", 60)
    local = build(server, corpus, tmp / "local", tmp / "cache-local", *LIMITED)
    assert local.returncode == 0, local.stderr
    return corpus, tmp / "local"


@pytest.mark.parametrize("executor", ["processes", "ray"])
def test_two_workers_share_one_rate_limit_and_write_local_bytes(server, limited_local, tmp_path, executor):
    """2 workers, 600 requests/min between them: the server sees at most that; same parquet as local."""
    if executor == "ray":
        pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'bsafe-data[ray]'")
    corpus, local = limited_local
    server.reset()
    pool = build(
        server, corpus, tmp_path / executor, tmp_path / "cache-pool", *LIMITED,
        "--set", f"execution.executor={executor}", "--set", "execution.workers=2",
    )  # fmt: skip
    assert pool.returncode == 0, pool.stderr
    arrivals = server.arrivals()
    assert len(arrivals) >= 40  # enough requests to go past the first second's burst
    assert_within_rate(arrivals, 600)
    assert parquet(tmp_path / executor) == parquet(local)
    # the workers' counters add up to what the server saw (the cache was new: every row asked)
    built = manifest(tmp_path / executor)
    clients = built["usage_by_client"]
    assert clients["generator"]["requests"] == len(arrivals) == built["usage"]["requests"]
    assert clients["classifier:builtin"]["texts"] > 0


def most_in_flight(arrivals: list[float], latency_s: float) -> int:
    """The most requests the server held at once: it answers each ``latency_s`` after it came, and a
    slot's next request leaves after that answer, so a window a little shorter than the latency
    holds at most one arrival per slot."""
    window = latency_s * 0.9
    return max((sum(1 for b in arrivals if a - window < b <= a) for a in arrivals), default=0)


def test_processes_workers_split_the_concurrency_limit(server, tmp_path):
    """max_concurrency 4 between 2 workers: each holds at most its 2 (a lone worker too), both
    busy together hold 4, never more (0.5 s latency); the rows are those of a local build."""
    server.reset(latency_s=0.5)
    extra = ("--set", "sampling.clean_fraction=0", "--set", "generator.max_concurrency=4",
             "--set", "output.chunk_rows=12")  # fmt: skip
    pool = ("--set", "execution.executor=processes", "--set", "execution.workers=2")
    try:
        lone = build(server, write_corpus(tmp_path / "one.jsonl", 12), tmp_path / "one", tmp_path / "c1",
                     *extra, *pool)  # fmt: skip
        lone_arrivals = server.arrivals()
        server.reset(latency_s=0.5)
        corpus = write_corpus(tmp_path / "two.jsonl", 24)
        both = build(server, corpus, tmp_path / "two", tmp_path / "c2", *extra, *pool)
        both_arrivals = server.arrivals()
        server.reset(latency_s=0.0)
        local = build(server, corpus, tmp_path / "local", tmp_path / "c3", *extra)
    finally:
        server.reset(latency_s=0.0)
    assert lone.returncode == 0 and both.returncode == 0 and local.returncode == 0, both.stderr
    assert len(lone_arrivals) == 12 and len(both_arrivals) == 24  # one request per row
    assert most_in_flight(lone_arrivals, 0.5) == 2, lone_arrivals
    assert 3 <= most_in_flight(both_arrivals, 0.5) <= 4, both_arrivals
    assert parquet(tmp_path / "two") == parquet(tmp_path / "local")


def test_the_next_chunks_requests_are_in_flight_while_a_chunk_is_finished(server, tmp_path):
    """Overlap: chunk i+1's requests leave before chunk i's answers are back (0.5 s latency)."""
    server.reset(latency_s=0.5)
    try:
        corpus = write_corpus(tmp_path / "c.jsonl", 40)
        extra = ("--set", "output.chunk_rows=10", "--set", "sampling.clean_fraction=0")
        done = build(server, corpus, tmp_path / "out", tmp_path / "cache", *extra)
        arrivals = server.arrivals()
    finally:
        server.reset(latency_s=0.0)
    assert done.returncode == 0, done.stderr
    assert len(arrivals) == 40  # one request per row, 10 per chunk
    # one chunk after another, chunk i+1's first request would come 0.5 s after chunk i's; started
    # before chunk i is finished, it comes with it (chunks 0 and 1, then 2 and 3 after chunk 0's
    # label and classify, which load lazily on the first chunk)
    for i in (0, 2):
        assert arrivals[10 * (i + 1)] - arrivals[10 * i] < 0.25, [round(a - arrivals[0], 2) for a in arrivals]
