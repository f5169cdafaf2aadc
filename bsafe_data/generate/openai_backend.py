"""Generator backend for OpenAI-compatible chat endpoints (OpenAI, vLLM, llama.cpp, TGI, ...).

Each request is rendered from the prompt template, looked up in the response cache, and otherwise
sent through the lean aiohttp engine (``bsafe_data.llm.client``). Answers are parsed with
``bsafe_data.inject.parse_output``. A refused, unparseable or truncated answer is re-asked with the
next seed (``seed + attempt``) and a reminder in the prompt, up to ``refusal_retries`` times; after
that the row gets ``generator_refused`` (last answer a refusal) or ``generator_unparseable`` (last
answer unparseable or truncated). A request whose transport retries run out gets
``generator_error``. ``FatalEndpointError`` (bad key, wrong URL) propagates and stops the run.

The ``usage`` property is cumulative over the generator's lifetime and readable after each batch:
``requests`` (HTTP requests sent, retries included), ``cache_hits``, ``retries`` (transport
retries), ``content_retries`` (re-asks after refusals/unparseable answers), ``input_tokens``,
``output_tokens`` (as reported by the server, cache hits excluded), ``cost_usd`` (from
``prices``: USD per 1M ``input``/``output`` tokens), and row outcomes ``refused``, ``unparseable``,
``errors``.

Batches run on the generator's own event loop, in a background thread: ``submit`` returns a future
at once, so the caller labels and classifies one chunk while the next chunk's requests are in
flight (batches share ``max_concurrency``, older batches first); ``generate_batch`` waits for it.
A batch's answers are committed to the cache before its future completes. While any batch runs,
the objects that existed before are frozen for the garbage collector (``heap.HEAP``), so full
collections do not stall the loop by re-scanning the whole heap.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.heap import HEAP
from bsafe_data.inject import (
    TEMPLATE_VERSION,
    ParsedOutput,
    load_template,
    parse_output,
    template_variables,
)
from bsafe_data.llm.cache import CachedResponse, ResponseCache, request_key
from bsafe_data.llm.client import ChatEngine, check_endpoint
from bsafe_data.llm.errors import RequestFailed, failure_detail
from bsafe_data.llm.shared import generator_role
from bsafe_data.llm.transport import resolve_endpoint
from bsafe_data.recipe import GeneratorSpec

T = TypeVar("T")

_CACHE_STATUS = {"ok": "ok", "unparseable": "ok", "refused": "refused", "truncated": "truncated"}
_ERROR_CODE = {
    "refused": "generator_refused",
    "unparseable": "generator_unparseable",
    "truncated": "generator_unparseable",
}
_PROGRESS_EVERY_S = 0.2
_SEED_MOD = 1 << 63
_USER_MARK = "\x00user\x00"
_SEED_MARK = "\x00seed\x00"


class OpenAIGenerator(Generator):
    """``Generator`` (backend ``"openai"``) for any OpenAI-compatible ``/chat/completions`` endpoint."""

    backend = "openai"

    def __init__(
        self,
        spec: GeneratorSpec,
        cache_dir: Path | None = None,
        progress: Callable[[dict], None] | None = None,
        *,
        backoff_base_s: float = 0.5,
        check: bool = True,
    ):
        """Set up the engine and cache; no network traffic until the first batch.

        ``check=False`` skips the ``GET /models`` check made before the first batch.
        """
        self.spec = spec
        self.model = spec.model
        self.template = spec.template
        self._prompt = load_template(spec.template)
        endpoint = resolve_endpoint(spec.base_url, spec.api_key_env)
        self.base_url = endpoint.base_url
        self._api_key = endpoint.api_key
        self._cache = ResponseCache(cache_dir, background=True)
        self._engine = ChatEngine(
            endpoint.base_url,
            endpoint.api_key,
            role=generator_role(),
            max_concurrency=spec.max_concurrency,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
            requests_per_minute=spec.requests_per_minute,
            tokens_per_minute=spec.tokens_per_minute,
            backoff_base_s=backoff_base_s,
        )
        self.endpoint = self._engine.endpoint
        self._progress = progress
        self._checked = not check
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        prices = spec.prices or {}
        self._price_in = float(prices.get("input", 0.0)) / 1e6
        self._price_out = float(prices.get("output", 0.0)) / 1e6
        self._counts = {"cache_hits": 0, "content_retries": 0, "refused": 0, "unparseable": 0, "errors": 0}
        self._skeletons: dict[str, tuple[str, str, str]] = {}
        self._sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "max_tokens": spec.max_tokens}

    # -- public API ----------------------------------------------------------------------------
    @property
    def usage(self) -> dict[str, Any]:
        """Cumulative usage counters (see the module docstring)."""
        stats = self._engine.stats
        cost = stats.input_tokens * self._price_in + stats.output_tokens * self._price_out
        return {
            "requests": stats.requests,
            "cache_hits": self._counts["cache_hits"],
            "retries": stats.retries,
            "content_retries": self._counts["content_retries"],
            "input_tokens": stats.input_tokens,
            "output_tokens": stats.output_tokens,
            "cost_usd": round(cost, 6),
            "refused": self._counts["refused"],
            "unparseable": self._counts["unparseable"],
            "errors": self._counts["errors"],
        }

    def check(self) -> list[str] | None:
        """Check the endpoint and key with ``GET /models`` (done once before the first batch).

        Raises ``FatalEndpointError`` if the key is rejected or the endpoint unreachable.
        """
        served = self._run(check_endpoint(self.base_url, self._api_key, self.model, self.spec.timeout_s))
        self._checked = True
        return served

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One ``Generation`` per request, in order. Raises ``FatalEndpointError`` to stop the run."""
        return _wait(self.submit(requests))

    def submit(
        self, requests: Sequence[GenerationRequest], sent: threading.Event | None = None
    ) -> Future[list[Generation]]:
        """Send a batch in the background; its future gives one ``Generation`` per request, in
        order (or raises ``FatalEndpointError``); ``sent`` is set once every request has left (or
        the batch ended). The endpoint is checked before the first batch."""
        if not requests:
            if sent is not None:
                sent.set()
            done: Future[list[Generation]] = Future()
            done.set_result([])
            return done
        if not self._checked:
            self.check()
        HEAP.enter()
        future = self._spawn(self._agenerate(list(requests), sent))
        future.add_done_callback(HEAP.exit)
        return future

    def close(self) -> None:
        """Stop the batches in flight, close connections, the loop and its thread, and the cache
        (pending cache rows are committed)."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        try:
            if loop is not None:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result()
                loop.call_soon_threadsafe(loop.stop)
                if thread is not None:
                    thread.join()
                loop.close()
        finally:
            self._cache.close()

    async def _shutdown(self) -> None:
        here = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not here and not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._engine.close()

    # -- internals -----------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the generator's loop and wait for it (from any thread, loop or not)."""
        return _wait(self._spawn(coro))

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coro`` on the generator's loop, started in its own thread on first use."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="bsafe-generator", daemon=True)
            self._thread.start()
            self._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _payload(self, system: str, user: Any, seed: Any) -> dict[str, Any]:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        return {"model": self.model, "messages": messages, "seed": seed, **self._sampling}

    def _skeleton(self, system: str) -> tuple[str, str, str]:
        """Canonical body split around the user text and the seed: splicing skips re-serialising
        the (long, constant) system prompt for every row. Gives the same bytes as ``json.dumps``."""
        found = self._skeletons.get(system)
        if found is None:
            text = json.dumps(
                self._payload(system, _USER_MARK, _SEED_MARK), sort_keys=True, separators=(",", ":")
            )
            head, rest = text.split(json.dumps(_USER_MARK), 1)
            middle, tail = rest.split(json.dumps(_SEED_MARK), 1)  # "messages" sorts before "seed"
            found = self._skeletons[system] = (head, middle, tail)
        return found

    def _body(self, request: GenerationRequest, attempt: int) -> tuple[bytes, str]:
        """Canonical JSON request body (sorted keys, compact) and its cache key."""
        base = self.spec.seed if self.spec.seed is not None else request.seed
        seed = (base + attempt) % _SEED_MOD
        variables = template_variables(request.context, request.part1, request.category, attempt)
        system = self._prompt.render_system(variables)
        user = self._prompt.render_user(variables)
        if self._prompt.static_system:
            head, middle, tail = self._skeleton(system)
            text = f"{head}{json.dumps(user)}{middle}{seed}{tail}"
        else:
            text = json.dumps(self._payload(system, user, seed), sort_keys=True, separators=(",", ":"))
        body = text.encode()
        return body, request_key(body, TEMPLATE_VERSION)

    async def _agenerate(
        self, requests: list[GenerationRequest], sent: threading.Event | None = None
    ) -> list[Generation]:
        engine, cache, counts = self._engine, self._cache, self._counts
        await engine.open()
        total = len(requests)
        first: dict[int, tuple[bytes, str]] = {}
        hits: dict[str, CachedResponse] = {}
        chunk = max(32, min(256, engine.max_concurrency))

        def rows() -> Iterator[int]:
            """Row indices; bodies and cache hits are prepared a chunk at a time, as workers reach
            them, so the first requests leave at once instead of after preparing the whole batch."""
            for start in range(0, total, chunk):
                stop = min(total, start + chunk)
                for index in range(start, stop):
                    first[index] = self._body(requests[index], 0)
                hits.update(cache.get_many([first[i][1] for i in range(start, stop)]))
                yield from range(start, stop)

        results: list[Generation | None] = [None] * total
        max_attempts = self.spec.refusal_retries + 1
        tracks_tokens = engine.tracks_tokens
        max_tokens = self.spec.max_tokens
        progress = self._progress
        done = 0
        last_report = time.monotonic()

        async def handle(index: int) -> None:
            nonlocal done, last_report
            request = requests[index]
            row = {"requests": 0, "cache_hits": 0, "retries": 0, "input_tokens": 0, "output_tokens": 0}
            parsed: ParsedOutput | None = None
            result: Generation | None = None
            for attempt in range(max_attempts):
                if attempt:
                    counts["content_retries"] += 1
                    body, key = self._body(request, attempt)
                    hit = cache.get(key)
                else:
                    body, key = first.pop(index)
                    hit = hits.pop(key, None)
                if hit is not None:
                    row["cache_hits"] += 1
                    counts["cache_hits"] += 1
                    parsed = parse_output(hit.text, request.part1, request.category, hit.finish_reason)
                else:
                    est = len(body) // 4 + max_tokens if tracks_tokens else 0
                    try:
                        answer = await engine.complete(body, est)
                    except RequestFailed as exc:
                        row["requests"] += exc.attempts
                        row["retries"] += exc.attempts - 1
                        cache.put(key, model=self.model, status="error", text="", detail=exc.reason)
                        counts["errors"] += 1
                        result = Generation(
                            category=request.category,
                            error="generator_error",
                            detail=failure_detail(exc),
                            usage=row,
                            transient=exc.transient,
                        )
                        break
                    row["requests"] += answer.attempts
                    row["retries"] += answer.attempts - 1
                    row["input_tokens"] += answer.input_tokens
                    row["output_tokens"] += answer.output_tokens
                    parsed = parse_output(answer.text, request.part1, request.category, answer.finish_reason)
                    cache.put(
                        key,
                        model=self.model,
                        status=_CACHE_STATUS[parsed.status],
                        text=answer.text,
                        finish_reason=answer.finish_reason,
                        input_tokens=answer.input_tokens,
                        output_tokens=answer.output_tokens,
                        detail=parsed.detail,
                    )
                if parsed.status == "ok":
                    result = Generation(
                        steering=parsed.steering,
                        violation=parsed.violation,
                        category=parsed.category,
                        detail=parsed.detail,
                        usage=row,
                    )
                    break
            if result is None:
                assert parsed is not None
                counts["refused" if parsed.status == "refused" else "unparseable"] += 1
                detail = f"{parsed.detail} (after {max_attempts} attempt(s))"
                result = Generation(
                    category=request.category, error=_ERROR_CODE[parsed.status], detail=detail, usage=row
                )
            results[index] = result
            done += 1
            if progress is not None:
                now = time.monotonic()
                if now - last_report >= _PROGRESS_EVERY_S:
                    last_report = now
                    progress({"done": done, "total": total, **self.usage})

        try:
            await engine.run(rows(), handle, total, started=sent.set if sent is not None else None)
        finally:
            if sent is not None:
                sent.set()  # also when the batch ends early (fatal error, cancelled)
            cache.flush()
        if progress is not None:
            progress({"done": done, "total": total, **self.usage})
        return [
            r if r is not None else Generation(error="generator_error", detail="not run", transient=True)
            for r in results
        ]


def _wait(future: Future[T]) -> T:
    """``future.result()``; on Ctrl-C (or any interruption) the batch is cancelled before leaving."""
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise
