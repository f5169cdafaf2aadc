"""The adaptive concurrency limit against a server that answers 429 above a number in flight.

Starts the test server (``tests/openai_server.py``) with ``max_in_flight``, sends ``--requests``
chat requests through one ``Transport`` configured for ``--max-concurrency``, and prints a trace
every ``--every`` seconds: time, the client's limit, the requests in flight at the server, and the
429s so far; then a summary (the settled range: quartiles of in-flight samples after the first
quarter of the run to nine tenths, 429s, requests lost).

    python benchmarks/concurrency_trace.py --server-limit 40 --max-concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from openai_server import ServerProcess  # noqa: E402

from bsafe_data.llm.client import CHAT_PATH, parse_completion  # noqa: E402
from bsafe_data.llm.errors import RequestFailed  # noqa: E402
from bsafe_data.llm.transport import Transport  # noqa: E402


def body(i: int) -> bytes:
    """A chat request of the injection protocol, distinct per ``i``."""
    payload = {
        "model": "test-model",
        "messages": [{"role": "user", "content": f"Target category: Toxic\nrow {i}"}],
        "seed": i,
        "max_tokens": 64,
    }
    return json.dumps(payload).encode()


async def run(args: argparse.Namespace, server: ServerProcess) -> tuple[int, list[tuple[float, int, int]]]:
    """Send the requests; (failed requests, [(t, limit, in flight at the client)] samples)."""
    transport = Transport(
        server.url,
        max_concurrency=args.max_concurrency,
        min_concurrency=args.min_concurrency,
        max_retries=args.max_retries,
        backoff_base_s=0.05,
    )
    failed = 0
    trace: list[tuple[float, int, int]] = []
    started = time.monotonic()

    async def one(i: int) -> None:
        nonlocal failed
        try:
            await transport.post(CHAT_PATH, body(i), parse_completion)
        except RequestFailed:
            failed += 1

    async def sample() -> None:
        while True:
            trace.append((time.monotonic() - started, transport.limit, transport.in_flight))
            await asyncio.sleep(args.every)

    async with transport:
        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(one(i) for i in range(args.requests)))
        sampler.cancel()
    return failed, trace


def main() -> None:
    """Run the trace and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-limit", type=int, default=40, help="429 above this many in flight")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per answer at the server")
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--min-concurrency", type=int, default=1)
    parser.add_argument("--max-retries", type=int, default=6)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--every", type=float, default=0.25, help="seconds between trace lines")
    args = parser.parse_args()
    with ServerProcess(latency_s=args.latency, max_in_flight=args.server_limit) as server:
        failed, trace = asyncio.run(run(args, server))
        samples = server.samples()
    print(f"{'t (s)':>7} {'limit':>6} {'in flight (server)':>19} {'429s':>6}")
    start = samples[0][0]
    for t, limit, _ in trace:
        at = [s for s in samples if s[0] - start <= t] or samples[:1]
        print(f"{t:7.2f} {limit:6d} {at[-1][1]:19d} {at[-1][2]:6d}")
    settled = [n for _, n, _ in steady(samples)]
    q1, median, q3 = statistics.quantiles(settled, n=4)
    inside = sum(30 <= n <= 45 for n in settled) / len(settled)
    print(
        f"settled in flight at the server: median {median:.0f}, quartiles {q1:.0f}-{q3:.0f}, "
        f"{inside:.0%} of samples in 30-45 (server limit {args.server_limit}); {samples[-1][2]} 429s "
        f"for {args.requests} requests; requests lost: {failed}; final limit {trace[-1][1]}"
    )


def steady(samples: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    """The steady part of a run's samples: from a quarter of its time to nine tenths (the start
    settles down from the maximum, the end drains)."""
    start, end = samples[0][0], samples[-1][0]
    return [s for s in samples if start + (end - start) / 4 <= s[0] <= start + (end - start) * 0.9]


if __name__ == "__main__":
    main()
