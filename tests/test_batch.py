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

import pyarrow.parquet as pq
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
            prompt = f"How should I plan a weekend trip, part {i}?"
            handle.write(json.dumps({"id": f"t{i}", "prompt": prompt, "response": ANSWER}) + "\n")
    return path


def args(server: ServerProcess, corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        CLI, "build", FLAGSHIP, "--out", str(out), "--source", str(corpus), "--cache-dir", str(cache),
        "--set", "generator.provider=openai", "--set", "generator.model=gen-model",
        "--set", f"generator.base_url={server.url}", "--set", "generator.api_key_env=BSAFE_BATCH_KEY",
        "--set", "generator.timeout_s=5", "--set", "generator.max_retries=2",
        "--set", "sampling.variants_per_answer=1", "--set", "sampling.clean_fraction=0.2", *extra,
    ]  # fmt: skip


def build(
    server: ServerProcess, corpus: Path, out: Path, cache: Path, *extra: str
) -> subprocess.CompletedProcess:  # noqa: E501
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


@pytest.fixture(scope="module")
def small(server, tmp_path_factory):
    """An online build of a 300-row corpus for the fault tests: (corpus, folder)."""
    tmp = tmp_path_factory.mktemp("small")
    corpus = write_corpus(tmp / "c.jsonl", 300)
    server.reset()
    done = build(server, corpus, tmp / "online", tmp / "cache")
    assert done.returncode == 0, done.stderr
    return corpus, tmp / "online"


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
    assert KEY not in (tmp_path / "out" / "manifest.json").read_text()
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


def test_sigkill_while_polling_then_a_rerun_reattaches_and_submits_nothing_again(server, small, tmp_path):
    corpus, reference = small
    server.reset(batch_delay_s=4.0)
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "BSAFE_BATCH_KEY": KEY}
    proc = subprocess.Popen(args(server, corpus, out, cache, *BATCH), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.stats()["batches"] < 1:
        time.sleep(0.05)
    time.sleep(0.5)  # polling: the batch is in progress
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stats = server.stats()
    assert stats["batches"] == stats["uploads"] == 1 and stats["batch_lines"] == 0
    states = [json.loads(p.read_text()) for p in batch_files(out)]
    assert [s["batch_id"] for s in states] == ["batch-1"] and not states[0]["done"]
    assert KEY not in json.dumps(states) and states[0]["api_key_env"] == "BSAFE_BATCH_KEY"
    again = build(server, corpus, out, cache, *BATCH)
    assert again.returncode == 0, again.stderr
    stats = server.stats()
    assert stats["batches"] == stats["uploads"] == 1 and stats["chat"] == 0  # re-attached: nothing new
    assert parquet(out) == parquet(reference)


def start(server: ServerProcess, corpus: Path, out: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "BSAFE_BATCH_KEY": KEY}
    return subprocess.Popen(args(server, corpus, out, cache, *BATCH), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def wait_for(condition, timeout: float = 120) -> None:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)
    assert condition()


def test_sigkill_between_upload_and_submit_then_a_rerun_finds_the_batch(server, small, tmp_path):
    """The server makes the batch but answers its create request late; the build is killed before it
    learns the id. The re-run finds the batch by its file and metadata: nothing submitted twice."""
    corpus, reference = small
    server.reset(batch_create_delay_s=3.0)
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = start(server, corpus, out, cache)
    wait_for(lambda: server.stats()["batches"] == 1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    states = [json.loads(p.read_text()) for p in batch_files(out)]
    assert len(states) == 1 and states[0]["input_file_id"] and states[0]["batch_id"] is None
    server.configure(batch_create_delay_s=0.0)
    again = build(server, corpus, out, cache, *BATCH)
    assert again.returncode == 0, again.stderr
    stats = server.stats()
    assert stats["batches"] == stats["uploads"] == 1 and stats["chat"] == 0
    assert parquet(out) == parquet(reference)


def test_cancelling_the_batches_of_a_killed_build_then_a_rerun_submits_them_again(server, small, tmp_path):
    corpus, reference = small
    server.reset(batch_delay_s=60.0)
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = start(server, corpus, out, cache)
    wait_for(lambda: any(json.loads(p.read_text())["batch_id"] for p in batch_files(out)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cancelled = cli("batches", "cancel", str(out))
    assert cancelled.returncode == 0 and "batch-1" in cancelled.stdout
    server.configure(batch_delay_s=0.0)
    again = build(server, corpus, out, cache, *BATCH)
    assert again.returncode == 0, again.stderr
    stats = server.stats()
    assert stats["batches"] == 2 and set(stats["batch_ids"][1]) == set(stats["batch_ids"][0])
    assert stats["chat"] == 0
    funnel(out)
    assert parquet(out) == parquet(reference)


def test_expired_lines_leave_an_incomplete_build_and_the_rerun_submits_exactly_those(server, small, tmp_path):
    corpus, reference = small
    server.reset(batch_expire_percent=5)
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = build(server, corpus, out, cache, *BATCH)
    assert first.returncode == 3, first.stderr
    expired = set(server.stats()["expired"])
    assert expired and f"incomplete: {len(expired)} row(s)" in first.stderr
    built = manifest(out)
    assert built["complete"] is False and built["transient_rows"] == len(expired)
    rows = [r for path in (out / "rejected").glob("*.parquet") for r in pq.read_table(path).to_pylist()]
    failed = [r for r in rows if r["reasons"] == ["generator_error"]]
    assert len(failed) == len(expired) and all("batch_expired" in r["detail"] for r in failed)
    funnel(out)
    again = build(server, corpus, out, cache, *BATCH)
    assert again.returncode == 0, again.stderr
    stats = server.stats()
    assert stats["batches"] == 2 and set(stats["batch_ids"][1]) == expired  # exactly those, once
    assert stats["chat"] == 0
    assert parquet(out) == parquet(reference)


def test_a_failed_batch_stops_the_build_and_a_rerun_finishes_it(server, small, tmp_path):
    corpus, reference = small
    server.reset(batch_fail=True)
    out, cache = tmp_path / "out", tmp_path / "cache"
    failed = build(server, corpus, out, cache, *BATCH)
    assert failed.returncode == 1, failed.stderr
    message = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(message) <= 4 and "batch failed" in failed.stderr and "generator endpoint" in failed.stderr
    assert not (out / "manifest.json").exists()
    server.reset()
    again = build(server, corpus, out, cache, *BATCH)
    assert again.returncode == 0, again.stderr
    assert server.stats()["batches"] == 1 and server.stats()["chat"] == 0  # the failed lines, again
    funnel(out)
    assert parquet(out) == parquet(reference)


def test_a_refused_upload_stops_the_build_with_one_message(server, small, tmp_path):
    corpus, reference = small
    server.reset(upload_status=413)
    out, cache = tmp_path / "out", tmp_path / "cache"
    refused = build(server, corpus, out, cache, *BATCH)
    assert refused.returncode == 1, refused.stderr
    message = [line for line in refused.stderr.splitlines() if line.strip()]
    assert (
        len(message) <= 4
        and "HTTP 413" in refused.stderr
        and "upload of a batch file refused" in refused.stderr
    )
    assert server.stats()["batches"] == 0 and not batch_files(out)  # nothing submitted, no state left
    server.reset()
    again = build(server, corpus, out, cache, *BATCH)
    assert again.returncode == 0, again.stderr
    funnel(out)
    assert parquet(out) == parquet(reference)


def test_batches_list_and_cancel_stop_a_running_build_and_a_rerun_finishes_it(server, small, tmp_path):
    corpus, reference = small
    server.reset(batch_delay_s=60.0)
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "BSAFE_BATCH_KEY": KEY}
    proc = subprocess.Popen(args(server, corpus, out, cache, *BATCH), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        json.loads(p.read_text())["batch_id"] for p in batch_files(out)
    ):
        time.sleep(0.05)
    listed = cli("batches", "list", str(out))
    assert listed.returncode == 0 and "batch-1" in listed.stdout and "in_progress" in listed.stdout
    cancelled = cli("batches", "cancel", str(out))
    assert cancelled.returncode == 0 and "batch-1" in cancelled.stdout and "cancelling" in cancelled.stdout
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in stderr
    assert "was cancelled" in stderr and "re-run" in stderr
    assert "generator: batches 1 in_progress" in stderr  # the progress display's batch line
    server.configure(batch_delay_s=0.0)
    again = build(server, corpus, out, cache, *BATCH)
    assert again.returncode == 0, again.stderr
    stats = server.stats()
    assert stats["batches"] == 2 and stats["chat"] == 0
    assert set(stats["batch_ids"][1]) == set(stats["batch_ids"][0])  # none had been answered
    funnel(out)
    assert parquet(out) == parquet(reference)
    assert "no batches" in cli("batches", "list", str(out)).stdout  # the finished build left none


def test_export_then_import_through_an_offline_engine_gives_the_same_bytes(server, small, tmp_path):
    corpus, reference = small
    server.reset()
    out, cache = tmp_path / "out", tmp_path / "cache"
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    exported = build(server, corpus, out, cache, "--batch-export", str(requests))
    assert exported.returncode == 5, exported.stderr
    assert "requests written to" in exported.stderr and "--batch-import" in exported.stderr
    lines = requests.read_bytes().splitlines()
    assert lines and server.stats()["chat"] == 0 and server.stats()["uploads"] == 0
    assert all(json.loads(line)["url"] == "/v1/chat/completions" for line in lines)
    config = json.dumps({"model": "gen-model"})
    subprocess.run([sys.executable, SERVER, "--config", config, "--run-batch", str(requests), str(answers)],
                   check=True, timeout=120)  # fmt: skip
    imported = build(server, corpus, out, cache, "--batch-import", str(answers))
    assert imported.returncode == 0, imported.stderr
    assert server.stats()["chat"] == 0
    funnel(out)
    assert parquet(out) == parquet(reference)


def test_plan_prices_batch_beside_online():
    prices = "generator.prices={input: 1000, output: 4000}"
    planned = cli("plan", FLAGSHIP, "--limit", "20", "--set", prices, "--set", "generator.mode=batch")
    assert planned.returncode == 0, planned.stderr
    costs = {}
    for line in planned.stdout.splitlines():
        if "estimated cost" in line:
            costs["batch" if "batch" in line else "online"] = float(
                line.split("$")[-1].split()[0].replace(",", "")
            )
    assert costs["online"] > 1 and costs["batch"] == pytest.approx(costs["online"] / 2, abs=0.01)


def test_a_judge_and_the_continuation_writer_run_in_rounds_of_batches(server, tmp_path):
    """BSAFE: the judge locates spans, the generator writes continuations, the judge checks them;
    each step's calls wait for the one before, so the build runs three rounds of batches, and
    writes the bytes of the online build."""
    server.reset(plain_answers=True, judge_words=["idiot", "moron", "stupid", "loser", "damn", "crap"])
    source = str(REPO / "bsafe_data" / "data" / "unsafe" / "unsafe_answers.jsonl")
    recipe = str(REPO / "recipes" / "bsafe.yaml")

    def bsafe(out: Path, cache: Path, mode: str) -> subprocess.CompletedProcess:
        judge = (f"{{name: judge, provider: llm_judge, model: judge-model, base_url: '{server.url}', "
                 f"api_key_env: BSAFE_BATCH_KEY, mode: {mode}}}")  # fmt: skip
        return cli(
            "build", recipe, "--out", str(out), "--source", source, "--cache-dir", str(cache),
            "--allow-empty",
            "--set", "generator.provider=openai", "--set", "generator.model=gen-model",
            "--set", f"generator.base_url={server.url}", "--set", "generator.api_key_env=BSAFE_BATCH_KEY",
            "--set", f"generator.mode={mode}", "--set", "batch.poll_interval_s=0.1",
            "--set", f"filters.classifiers=[{{name: builtin, provider: builtin}}, {judge}]",
        )  # fmt: skip

    try:
        online = bsafe(tmp_path / "online", tmp_path / "cache-online", "online")
        assert online.returncode == 0, online.stderr
        sent = server.stats()["chat"]
        server.reset(plain_answers=True, judge_words=["idiot", "moron", "stupid", "loser", "damn", "crap"])
        batched = bsafe(tmp_path / "batch", tmp_path / "cache-batch", "batch")
        assert batched.returncode == 0, batched.stderr
        stats = server.stats()
    finally:
        server.reset()
    kept = funnel(tmp_path / "batch")["kept"]
    assert kept > 0 and stats["chat"] == 0 and stats["batch_lines"] == sent
    assert stats["batches"] == 3  # locate (judge), continue (generator), check (judge)
    assert parquet(tmp_path / "batch") == parquet(tmp_path / "online")


def test_files_are_cut_by_requests_and_bytes_and_result_lines_are_read_strictly(tmp_path):
    from bsafe_data.llm.batch import read_outcomes, request_line, split_files

    lines = [(f"k{i}", request_line(f"k{i}", "/v1/chat/completions", b'{"seed":%d}' % i)) for i in range(10)]
    size = len(lines[0][1])
    assert [len(g) for g in split_files(lines, 4, 10**9)] == [4, 4, 2]
    assert [len(g) for g in split_files(lines, 100, 3 * size)] == [3, 3, 3, 1]
    assert json.loads(lines[3][1])["body"] == {"seed": 3}
    ok = {"custom_id": "a", "response": {"status_code": 200, "body": {"choices": []}}, "error": None}
    expired = {"custom_id": "b", "response": None, "error": {"code": "batch_expired", "message": "late"}}
    refused = {"custom_id": "c", "response": {"status_code": 400, "body": {}}, "error": None}
    data = "\n".join(json.dumps(x) for x in (ok, expired, refused)).encode()
    found = read_outcomes(data, "f")
    assert found["a"].body == b'{"choices":[]}' and found["b"].body is None and not found["b"].final
    assert "batch_expired" in found["b"].reason and found["c"].final  # a 400 is the endpoint's answer
    with pytest.raises(ValueError, match="f line 2"):
        read_outcomes(b'{"custom_id": "a"}\nnot json\n', "f")


def test_a_bad_import_file_is_one_message(server, small, tmp_path):
    corpus, _ = small
    server.reset()
    missing = build(
        server, corpus, tmp_path / "out", tmp_path / "cache", "--batch-import", str(tmp_path / "no")
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not a batch output\n")
    broken = build(server, corpus, tmp_path / "out", tmp_path / "cache", "--batch-import", str(bad))
    assert broken.returncode == 1 and "bad.jsonl line 1 is not a batch result line" in broken.stderr
    assert len([line for line in broken.stderr.splitlines() if line.strip()]) <= 4
