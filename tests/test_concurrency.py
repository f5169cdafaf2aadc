"""Adaptive concurrency: the AIMD limit on its own, and a real build against a server that answers
429 above 40 requests in flight (it settles near 40 and loses nothing)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_server import ServerProcess  # noqa: E402

from bsafe_data.llm.concurrency import AdaptiveLimit  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.test_faults import corpus, good_rows, parquet_bytes  # noqa: E402

CLI = str(Path(sys.executable).with_name("bsafe-data"))
FLAGSHIP = str(REPO / "recipes" / "bsafe_plus.yaml")


def test_a_burst_of_429s_from_one_window_lowers_the_limit_once():
    limit = AdaptiveLimit(256, 4)
    sent = limit.epoch
    assert limit.throttle(sent) and limit.limit == 192
    for _ in range(50):  # the rest of the burst answers the level already left
        assert limit.throttle(sent)
    assert limit.limit == 192 and limit.throttled == 51
    while limit.limit > 4:
        assert limit.throttle(limit.epoch)
    assert limit.limit == 4 and limit.lowest == 4
    assert not limit.throttle(limit.epoch)  # at the floor: the 429 costs a retry


def test_a_run_of_successes_adds_one_only_while_the_limit_binds():
    limit = AdaptiveLimit(64, 1)
    limit.throttle(0)
    assert limit.limit == 48
    for _ in range(47):
        limit.succeeded(binding=True)
    for _ in range(500):
        limit.succeeded(binding=False)  # nobody waits: growing the limit means nothing
    assert limit.limit == 48
    limit.succeeded(binding=True)
    assert limit.limit == 49 and limit.highest == 64
    fixed = AdaptiveLimit(8, 8)
    assert not fixed.throttle(0) and fixed.limit == 8


def build(url: str, path: Path, out: Path, cache: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            CLI, "build", FLAGSHIP, "--out", str(out), "--source", str(path), "--cache-dir", str(cache),
            "--set", "generator.provider=openai", "--set", "generator.model=test-model",
            "--set", f"generator.base_url={url}", "--set", "generator.max_concurrency=256",
            "--set", "generator.max_retries=2", "--set", "generator.timeout_s=30",
            "--set", "sampling.variants_per_answer=1", "--set", "sampling.clean_fraction=0",
        ],  # fmt: skip
        capture_output=True, text=True, timeout=600, env=os.environ,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_a_build_for_256_settles_under_a_limit_of_40_and_loses_nothing(tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(1500))
    with ServerProcess(latency_s=0.2) as unlimited:
        reference = build(unlimited.url, path, tmp_path / "reference", tmp_path / "cache_ref")
    assert reference.returncode == 0, reference.stderr
    with ServerProcess(latency_s=0.2, max_in_flight=40) as limited:
        proc = build(limited.url, path, tmp_path / "out", tmp_path / "cache")
        samples = limited.samples()
    assert proc.returncode == 0, proc.stderr  # complete: no row failed
    assert parquet_bytes(tmp_path / "out") == parquet_bytes(tmp_path / "reference")
    usage = json.loads((tmp_path / "out" / "manifest.json").read_text())["usage"]
    assert usage["max_concurrency"] == 256 and usage["throttled"] == samples[-1][2] > 0
    assert 1 <= usage["concurrency_lowest"] <= 45 and usage["concurrency_final"] <= 60
    start, end = samples[0][0], samples[-1][0]  # the steady part: past the descent, before the drain
    steady = [n for t, n, _ in samples if start + (end - start) / 4 <= t <= start + (end - start) * 0.9]
    assert len(steady) >= 20, samples
    assert 30 <= statistics.median(steady) <= 45, steady
    assert sum(n <= 45 for n in steady) >= 0.9 * len(steady), steady  # never far above the limit


def test_a_spent_rate_limit_budget_lowers_the_limit_like_a_429():
    import asyncio

    from bsafe_data.llm.client import CHAT_PATH, parse_completion
    from bsafe_data.llm.transport import Transport

    body = b'{"model": "test-model", "messages": [{"role": "user", "content": "Target category: Toxic"}]}'
    spent = {"remaining-requests": "0", "reset-requests": "10ms"}
    with ServerProcess(ratelimit=spent) as srv:
        transport = Transport(srv.url, max_concurrency=8, min_concurrency=2)

        async def main() -> None:
            async with transport:
                await asyncio.gather(*(transport.post(CHAT_PATH, body, parse_completion) for _ in range(40)))

        asyncio.run(main())
        assert srv.stats()["chat"] == 40  # paused, never refused: nothing asked twice
    usage = transport.concurrency.usage()
    assert usage["throttled"] > 0 and usage["concurrency_lowest"] < 8 and usage["min_concurrency"] == 2
