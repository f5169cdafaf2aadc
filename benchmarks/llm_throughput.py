"""Throughput of the generator stage against a local OpenAI-compatible server.

Starts ``tests/openai_server.py`` in its own process (50 ms latency per request) and measures, in
one run, at each in-flight level:

* ``bare``    — a bare aiohttp loop: N requests, ``in_flight`` workers, one session;
* ``lean``    — the same with the engine's session settings and pre-serialised bodies (a floor);
* ``openai``  — a plain ``AsyncOpenAI`` loop (fewer requests: it is CPU-bound);
* ``engine``  — ``OpenAIGenerator.generate_batch`` over N rows, with a fresh cache (no hits).

It prints requests/s (best and median of alternating runs), the ratios to the ideal
(``in_flight / latency``) and to the bare loop, and the client's CPU time per request (all threads).
Usage: ``python benchmarks/llm_throughput.py [--n 4000] [--in-flight 64 256] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from openai_server import ServerProcess  # noqa: E402

from bsafe_data.generate.base import GenerationRequest  # noqa: E402
from bsafe_data.generate.openai_backend import OpenAIGenerator  # noqa: E402
from bsafe_data.inject import load_template  # noqa: E402
from bsafe_data.recipe import GeneratorSpec  # noqa: E402

MODEL = "test-model"
PART1 = (
    "Sourdough needs three things: flour, water and time. Mix the starter the evening before, "
    "let it double overnight, and in the morning combine it with the rest of the flour."
)


def make_requests(n: int, tag: str) -> list[GenerationRequest]:
    """N distinct generation requests (distinct prompts, so no cache hits)."""
    return [
        GenerationRequest(
            row_id=f"{tag}-{i}",
            context=(("user", f"How do I bake sourdough bread? (question {tag}-{i})"),),
            part1=PART1,
            category="Toxic",
            seed=i,
        )
        for i in range(n)
    ]


def payloads(requests: list[GenerationRequest]) -> list[dict]:
    """The same chat payloads the generator sends, pre-rendered (the bare loops skip templating)."""
    template = load_template("continue_violation")
    return [
        {
            "model": MODEL,
            "messages": template.render(r.context, r.part1, r.category),
            "temperature": 0.9,
            "top_p": 1.0,
            "max_tokens": 256,
            "seed": r.seed,
        }
        for r in requests
    ]


async def _timed_posts(
    session: aiohttp.ClientSession, url: Any, bodies: list[Any], in_flight: int, encode: Any
) -> tuple[float, float]:
    """POST every body with ``in_flight`` workers, parse the JSON, take the content.

    Returns (requests/s, client CPU µs/request); ``encode`` turns a body into bytes inside the loop.
    """
    source = iter(bodies)
    texts: list[str] = []

    async def worker() -> None:
        for body in source:
            async with session.post(url, data=encode(body)) as resp:
                data = json.loads(await resp.read())
            texts.append(data["choices"][0]["message"]["content"])

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert len(texts) == len(bodies)
    return len(bodies) / elapsed, cpu / len(bodies) * 1e6


async def bare_loop(url: str, bodies: list[dict], in_flight: int) -> tuple[float, float]:
    """(requests/s, client CPU µs/request) of a bare aiohttp loop.

    Serialise, POST, parse the JSON, take the content."""
    connector = aiohttp.TCPConnector(limit=in_flight)
    headers = {"Authorization": "Bearer EMPTY", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        return await _timed_posts(session, url, bodies, in_flight, lambda p: json.dumps(p).encode())


async def lean_bare_loop(url: str, bodies: list[dict], in_flight: int) -> tuple[float, float]:
    """Like ``bare_loop`` with the engine's session settings (no cookie jar, URL parsed once) and
    bodies serialised before the clock starts: the floor of aiohttp's own cost per request."""
    from yarl import URL

    connector = aiohttp.TCPConnector(limit=in_flight)
    headers = {"Authorization": "Bearer EMPTY", "Content-Type": "application/json"}
    raw_bodies = [json.dumps(p).encode() for p in bodies]
    async with aiohttp.ClientSession(
        connector=connector,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=60),
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        return await _timed_posts(session, URL(url), raw_bodies, in_flight, lambda b: b)


async def openai_loop(base_url: str, bodies: list[dict], in_flight: int) -> tuple[float, float]:
    """(requests/s, client CPU µs/request) of a plain AsyncOpenAI loop."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="EMPTY", max_retries=0, http_client=httpx.AsyncClient(limits=limits)
    )
    source = iter(bodies)
    count = 0

    async def worker() -> None:
        nonlocal count
        for payload in source:
            response = await client.chat.completions.create(**payload)
            assert response.choices[0].message.content
            count += 1

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await client.close()
    return count / elapsed, cpu / count * 1e6


def engine_run(base_url: str, requests: list[GenerationRequest], in_flight: int) -> tuple[float, float]:
    """(requests/s, client CPU µs/request) of OpenAIGenerator.generate_batch with an empty cache.

    The one-off endpoint check (GET /models) is made before the clock starts."""
    spec = GeneratorSpec(provider="openai", model=MODEL, base_url=base_url, max_concurrency=in_flight)
    with tempfile.TemporaryDirectory() as cache_dir:
        generator = OpenAIGenerator(spec, cache_dir=Path(cache_dir))
        try:
            generator.check()  # one-off GET /models, done once per run before the first batch
            gc.collect()
            start, cpu = time.perf_counter(), time.process_time()
            results = generator.generate_batch(requests)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            bad = [g.error for g in results if g.error]
            assert not bad, bad[:3]
            assert generator.usage["requests"] == len(requests) and generator.usage["cache_hits"] == 0
        finally:
            generator.close()
    return len(requests) / elapsed, cpu / len(requests) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="requests per bare/engine measurement")
    parser.add_argument("--openai-n", type=int, default=600, help="requests per AsyncOpenAI measurement")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per client")
    parser.add_argument("--verbose", action="store_true", help="print every run")
    args = parser.parse_args()

    with ServerProcess(latency_s=args.latency, model=MODEL) as server:
        url = server.url + "/chat/completions"
        asyncio.run(bare_loop(url, payloads(make_requests(500, "warm")), 64))  # warm up the server
        print(
            f"server latency {args.latency * 1000:.0f} ms, N={args.n} (AsyncOpenAI N={args.openai_n}), "
            f"{args.repeats} alternating runs per client; req/s best and median; client CPU per request"
        )
        header = f"{'in-flight':>9} {'client':>7} {'best':>6} {'median':>6} {'best/ideal':>10} "
        print(header + f"{'best/bare':>9} {'median/bare':>11} {'best/lean':>9} {'cpu us/req':>10}")
        for in_flight in args.in_flight:
            ideal = in_flight / args.latency
            runs: dict[str, list[tuple[float, float]]] = {"bare": [], "lean": [], "openai": [], "engine": []}
            for rep in range(args.repeats):
                # every timed run starts from a collected heap: no run inherits another's garbage
                bodies = payloads(make_requests(args.n, f"{in_flight}-{rep}"))
                gc.collect()
                runs["bare"].append(asyncio.run(bare_loop(url, bodies, in_flight)))
                reqs = make_requests(args.n, f"{in_flight}-{rep}-engine")
                gc.collect()
                runs["engine"].append(engine_run(server.url, reqs, in_flight))
                bodies = payloads(make_requests(args.n, f"{in_flight}-{rep}-lean"))
                gc.collect()
                runs["lean"].append(asyncio.run(lean_bare_loop(url, bodies, in_flight)))
                if rep == 0:
                    bodies = payloads(make_requests(args.openai_n, f"{in_flight}-{rep}-openai"))
                    gc.collect()
                    runs["openai"].append(asyncio.run(openai_loop(server.url, bodies, in_flight)))
            best = {name: max(r for r, _ in values) for name, values in runs.items()}
            median = {name: statistics.median(r for r, _ in values) for name, values in runs.items()}
            cpu = {name: statistics.median(c for _, c in values) for name, values in runs.items()}
            for name in ("bare", "lean", "openai", "engine"):
                print(
                    f"{in_flight:>9} {name:>7} {best[name]:>6.0f} {median[name]:>6.0f} "
                    f"{best[name] / ideal:>10.2f} "
                    f"{best[name] / best['bare']:>9.2f} {median[name] / median['bare']:>11.2f} "
                    f"{best[name] / best['lean']:>9.2f} {cpu[name]:>10.0f}"
                )
            if args.verbose:
                print("   runs:", {k: [round(r) for r, _ in v] for k, v in runs.items()})
        print(f"server saw {server.stats()['chat']} chat requests")


if __name__ == "__main__":
    main()
