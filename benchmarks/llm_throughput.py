"""Throughput of the generator stage against a local OpenAI-compatible server.

Starts ``tests/openai_server.py`` in its own process (50 ms latency per request) and measures, in
one run, at each in-flight level:

* ``bare``    — a bare aiohttp loop: N requests, ``in_flight`` workers, one session;
* ``lean``    — the same with the engine's session settings and pre-serialised bodies (a floor);
* ``openai``  — a plain ``AsyncOpenAI`` loop (fewer requests: it is CPU-bound);
* ``engine``  — ``OpenAIGenerator.generate_batch`` over N rows, with a fresh cache (no hits).

It prints requests/s (best and median of alternating runs), the ratios to the ideal
(``in_flight / latency``) and to the bare loop, and the client's CPU time per request (all threads).

``--mode build`` runs whole flagship builds (``pipeline.build``, local executor, a synthetic corpus)
against the same server instead of ``generate_batch`` alone, alternating with bare loops: the
generation stage's rate inside a build is the server's arrival rate of the build's requests.
``--mode e2e`` times whole builds against a 1 s server (wall time against ``requests / in_flight ×
latency`` plus set-up) and a 50 ms server (the server's in-flight count between the first and the
last 5% of requests); ``--executor processes`` runs those builds on the worker pool (whose workers
share the endpoint's slots). The server and this process share the system's monotonic clock.

``--mode real`` is the user's workload: each method's build (``benchmarks/workloads.py``) whose
generator, Llama Guard and (BSAFE+, BSAFE) LLM judge are all remote, every endpoint at ``--latency``
(default 1 s here) and ``--concurrency`` in flight. Each build runs in a fresh process
(``build_once.py``); with ``--baseline REV`` the same workloads are also built by the package at
commit REV (a temporary git worktree), side by side in one run. It prints, per build, every
endpoint's requests, the busiest endpoint's ideal time (its requests / its concurrency x latency),
(wall time - set-up) / ideal (set-up: the process start to the first request any endpoint sees) and
whether the parquet files are byte-identical to the baseline's.

Usage: ``python benchmarks/llm_throughput.py [--mode engine|build|e2e|real] [--n 3000] [--in-flight 64 256]
[--repeats 3] [--rows 3000] [--chunk-rows 2000] [--executor local|processes] [--methods ...]
[--baseline REV] [--concurrency 64]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from guard_server import GuardServerProcess  # noqa: E402
from openai_server import ServerProcess  # noqa: E402
from synthetic_corpus import write_corpus  # noqa: E402
from workloads import METHODS, write_workload  # noqa: E402

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


def build_run(
    server: ServerProcess, corpus: Path, in_flight: int, chunk_rows: int, executor: str = "local"
) -> dict[str, Any]:
    """A whole flagship build (builtin classifier, both tokenizers) whose generator is the server.

    Returns the build's start and end (monotonic), the server's request arrivals and the timings."""
    from bsafe_data.pipeline import build
    from bsafe_data.registry import load_recipe

    os.environ["BSAFE_BENCH_KEY"] = "EMPTY"
    overrides = [
        "sources=[{path: " + str(corpus) + "}]",
        "sampling.variants_per_answer=1",
        "generator.provider=openai",
        f"generator.model={MODEL}",
        f"generator.base_url={server.url}",
        "generator.api_key_env=BSAFE_BENCH_KEY",
        f"generator.max_concurrency={in_flight}",
        f"output.chunk_rows={chunk_rows}",
        f"execution.executor={executor}",
    ]
    recipe = load_recipe(ROOT / "recipes" / "bsafe_plus.yaml", overrides)
    server.reset()
    with tempfile.TemporaryDirectory() as tmp:
        gc.collect()
        start = time.monotonic()
        result = build(recipe, Path(tmp) / "out", cache_dir=Path(tmp) / "cache")
        end = time.monotonic()
    arrivals = server.arrivals()
    assert result.usage["requests"] == len(arrivals) and result.usage["cache_hits"] == 0
    return {"start": start, "end": end, "arrivals": arrivals, "timings": result.timings}


def arrival_rate(arrivals: list[float]) -> float:
    """Requests per second between the first and the last arrival."""
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def mean_in_flight(arrivals: list[float], latency: float, trim: float = 0.05) -> float:
    """The server's mean in-flight count between the first and the last ``trim`` of requests.

    The server answers every request ``latency`` after it arrived, so at time t it holds the
    requests that arrived in (t - latency, t]; sampled every millisecond."""
    lo, hi = arrivals[int(len(arrivals) * trim)], arrivals[int(len(arrivals) * (1 - trim)) - 1]
    samples, total, left, right, t = 0, 0, 0, 0, lo
    while t <= hi:
        while right < len(arrivals) and arrivals[right] <= t:
            right += 1
        while left < right and arrivals[left] <= t - latency:
            left += 1
        total += right - left
        samples += 1
        t += 0.001
    return total / max(1, samples)


def build_mode(args: argparse.Namespace) -> None:
    """The generation stage inside a real build against the bare loop, same server, same run.

    Two builds per run: one chunk (the batch runs while the build waits for it: the stage alone,
    with everything a build adds per request) and ``--chunk-rows`` chunks (the next chunk's batch
    overlaps this chunk's label and classify, which share the interpreter with the event loop)."""
    with ServerProcess(latency_s=args.latency, model=MODEL) as server, tempfile.TemporaryDirectory() as tmp:
        url = server.url + "/chat/completions"
        asyncio.run(bare_loop(url, payloads(make_requests(500, "warm")), 64))
        print(
            f"server latency {args.latency * 1000:.0f} ms; builds of {args.rows} rows, bare loops of "
            f"N={args.n}; {args.repeats} alternating runs; medians of requests/s (builds: the server's "
            "arrival rate of the build's requests) and build wall time"
        )
        print(
            f"{'in-flight':>9} {'bare':>6} {'1 chunk':>7} {'/bare':>5} {'build s':>7} "
            f"{f'{args.chunk_rows}-row chunks':>16} {'/bare':>5} {'build s':>7}"
        )
        for in_flight in args.in_flight:
            bare: list[float] = []
            alone: list[dict[str, Any]] = []
            overlapped: list[dict[str, Any]] = []
            for rep in range(args.repeats):
                corpus = write_corpus(Path(tmp) / f"c-{in_flight}-{rep}.jsonl", args.rows)
                bodies = payloads(make_requests(args.n, f"{in_flight}-{rep}"))
                gc.collect()
                bare.append(asyncio.run(bare_loop(url, bodies, in_flight))[0])
                alone.append(build_run(server, corpus, in_flight, args.rows))
                overlapped.append(build_run(server, corpus, in_flight, args.chunk_rows))
            b = statistics.median(bare)
            r1 = statistics.median(arrival_rate(x["arrivals"]) for x in alone)
            r2 = statistics.median(arrival_rate(x["arrivals"]) for x in overlapped)
            t1 = statistics.median(x["end"] - x["start"] for x in alone)
            t2 = statistics.median(x["end"] - x["start"] for x in overlapped)
            print(
                f"{in_flight:>9} {b:>6.0f} {r1:>7.0f} {r1 / b:>5.2f} {t1:>7.1f} "
                f"{r2:>16.0f} {r2 / b:>5.2f} {t2:>7.1f}"
            )
            if args.verbose:
                print("   bare:", [round(x) for x in bare])


def e2e_mode(args: argparse.Namespace) -> None:
    """Whole builds: wall time against the 1 s server, occupancy against the 50 ms server."""
    in_flight = args.in_flight[-1]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "c.jsonl", args.rows)
        with ServerProcess(latency_s=1.0, model=MODEL) as server:
            run = build_run(server, corpus, in_flight, args.chunk_rows, args.executor)
        arrivals = run["arrivals"]
        total, setup = run["end"] - run["start"], arrivals[0] - run["start"]
        tail = run["end"] - (arrivals[-1] + 1.0)  # the last chunk's label and classify, the write
        write = run["timings"]["write_dataset"]
        ideal = len(arrivals) / in_flight * 1.0
        print(
            f"1 s server, {in_flight} in flight, {args.rows} rows, chunk_rows {args.chunk_rows}, "
            f"executor {args.executor}: "
            f"{len(arrivals)} requests, build {total:.1f} s = set-up {setup:.1f} s (to the first request) "
            f"+ {total - setup - tail:.1f} s + {tail:.1f} s after the last answer (of which the dataset "
            f"write {write:.1f} s)"
        )
        print(
            f"  ideal requests/{in_flight} x 1 s = {ideal:.1f} s; (build - set-up) / ideal = "
            f"{(total - setup) / ideal:.2f}; (build - set-up - write) / ideal = "
            f"{(total - setup - write) / ideal:.2f}; (build - set-up - tail) / ideal = "
            f"{(total - setup - tail) / ideal:.2f}; "
            f"server in flight (5-95%) {mean_in_flight(arrivals, 1.0):.0f}"
        )
        with ServerProcess(latency_s=0.05, model=MODEL) as server:
            run = build_run(server, corpus, in_flight, args.chunk_rows, args.executor)
            # what this machine allows: the bare aiohttp loop's occupancy, same server, same count
            server.reset()
            asyncio.run(bare_loop(server.url + "/chat/completions", payloads(make_requests(
                len(run["arrivals"]), "e2e-bare")), in_flight))  # fmt: skip
            bare = mean_in_flight(server.arrivals(), 0.05)
        arrivals = run["arrivals"]
        occupancy = mean_in_flight(arrivals, 0.05)
        print(
            f"50 ms server, {in_flight} in flight: {len(arrivals)} requests over "
            f"{arrivals[-1] - arrivals[0]:.1f} s, build {run['end'] - run['start']:.1f} s; server in flight "
            f"between the first and last 5% of requests: mean {occupancy:.0f} = {occupancy / in_flight:.2f} "
            f"of the limit; a bare aiohttp loop of as many requests: {bare:.0f} = {bare / in_flight:.2f} "
            f"(build / bare {occupancy / bare:.2f})"
        )
        print(f"  stage timings of that build (s): {run['timings']}")


#: rows per workload, sized so that the busiest endpoint has ~2,000 requests
WORKLOAD_ROWS = {"bsafe_plus": 500, "bsafe": 800, "derta": 500, "reset": 800, "rlbf_prompts": 500}


def _baseline_tree(rev: str, tmp: Path) -> Path:
    """A temporary worktree of ``rev`` (removed by the caller's ``git worktree prune``)."""
    import subprocess

    tree = tmp / f"baseline-{rev[:12]}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), rev], check=True)
    return tree


def _build_in(tree: Path, recipe: Path, out: Path, cache: Path) -> dict[str, Any]:
    import subprocess

    env = {**os.environ, "BSAFE_BENCH_KEY": "EMPTY", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "build_once.py"), str(tree), str(recipe), str(out),
         str(cache)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"build with {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def real_mode(args: argparse.Namespace) -> None:
    """Each method's real workload, old (``--baseline``) and new side by side."""
    import shutil
    import subprocess

    latency = args.latency if args.latency != 0.05 else 1.0  # the default of the other modes is 50 ms
    conc = args.concurrency
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trees = [("new", ROOT)]
        if args.baseline:
            trees.insert(0, ("old", _baseline_tree(args.baseline, tmp)))
        try:
            with ServerProcess(latency_s=latency, model="gen-model", plain_answers=True) as gen, \
                    GuardServerProcess(latency_s=latency) as guard:  # fmt: skip
                print(
                    f"real workload: every endpoint {latency:g} s latency, {conc} in flight each; "
                    f"baseline {args.baseline or '-'}; builds in fresh processes"
                )
                header = (
                    f"{'method':<12} {'code':<4} {'rows':>5} {'generator':>9} {'guard':>6} {'judge':>6} "
                    f"{'ideal s':>7} {'set-up':>6} {'wall':>6} {'cpu s':>6} "
                    f"{'(wall-setup)/ideal':>18}  parquet"
                )
                print(header)
                for method in args.methods:
                    rows = args.rows if args.rows != 3000 else WORKLOAD_ROWS[method]
                    folder = tmp / method
                    recipe = write_workload(method, folder, gen.url, guard.url, rows, conc)
                    hashes: dict[str, dict[str, str]] = {}
                    for name, tree in trees:
                        gen.reset()
                        guard.reset()
                        out, cache = folder / f"out-{name}", folder / f"cache-{name}"
                        gc.collect()
                        run = _build_in(tree, recipe, out, cache)
                        arrivals = sorted(gen.arrivals() + guard.arrivals())
                        by_endpoint = {"generator": len(gen.arrivals())}
                        guard_stats = guard.stats()
                        judge = _judge_requests(folder / f"out-{name}")
                        by_endpoint["judge"] = judge
                        by_endpoint["guard"] = guard_stats.get("requests", 0) - judge
                        ideal = max(by_endpoint.values()) / conc * latency
                        setup = (arrivals[0] - run["started"]) if arrivals else 0.0
                        wall = run["ended"] - run["started"]
                        hashes[name] = run["hashes"]
                        same = ""
                        if name == "new" and "old" in hashes:
                            same = "identical" if hashes["old"] == hashes["new"] else "DIFFERENT"
                        print(
                            f"{method:<12} {name:<4} {run['funnel']['rows']:>5} "
                            f"{by_endpoint['generator']:>9} "
                            f"{by_endpoint['guard']:>6} {by_endpoint['judge']:>6} {ideal:>7.1f} "
                            f"{setup:>6.1f} {wall:>6.1f} {run.get('cpu_s', 0):>6.1f} "
                            f"{(wall - setup) / ideal:>18.2f}  {same}",
                            flush=True,
                        )
                        if args.verbose:
                            for file, digest in sorted(run["hashes"].items()):
                                print(f"    {file} {digest}")
                            print(f"    timings {run['timings']}")
                        shutil.rmtree(cache, ignore_errors=True)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[0][1])],
                               check=False)  # fmt: skip


def _judge_requests(out: Path) -> int:
    """The judge's requests of a build, from its manifest (the guard server serves both)."""
    manifest = json.loads((out / "manifest.json").read_text())
    return int(manifest.get("usage_by_client", {}).get("classifier:judge", {}).get("requests", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="requests per bare/engine measurement")
    parser.add_argument("--openai-n", type=int, default=600, help="requests per AsyncOpenAI measurement")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per client")
    parser.add_argument("--verbose", action="store_true", help="print every run")
    parser.add_argument("--mode", choices=["engine", "build", "e2e", "real"], default="engine")
    parser.add_argument("--rows", type=int, default=3000, help="corpus rows per build (build, e2e)")
    parser.add_argument("--chunk-rows", type=int, default=2000, help="output.chunk_rows (recipe default)")
    parser.add_argument(
        "--executor", choices=["local", "processes"], default="local", help="execution.executor (e2e mode)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["bsafe_plus", "bsafe", "derta",
                        "reset"], help="real mode: the methods' workloads")  # fmt: skip
    parser.add_argument("--baseline", help="real mode: also build with the package at this git revision")
    parser.add_argument("--concurrency", type=int, default=64, help="real mode: in flight per endpoint")
    args = parser.parse_args()
    if args.mode == "real":
        return real_mode(args)
    if args.mode == "build":
        return build_mode(args)
    if args.mode == "e2e":
        return e2e_mode(args)

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
