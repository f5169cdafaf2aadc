"""The engine: every model call of a build (generator, companion writers, classifiers, judges,
reward critics) goes through one event loop, one response cache and one transport per endpoint.

``Engine.submit(coroutine)`` runs a client's coroutine on the engine's loop (a daemon thread started
on first use) and returns a ``concurrent.futures.Future``, so the caller never blocks while a request
is in flight. Clients are thin: they build a ``Call`` (the canonical body, its cache key, how to
read and store the answer) and ``await endpoint.ask(call)``, which is the one cache get -> fetch ->
put loop:

* a served cache entry (``ok``/``refused``) is the answer, no request;
* an identical call already in flight is awaited, not sent twice (and an answer fetched moments
  ago, still queued for the cache's writer, is served from memory);
* otherwise the endpoint's ``Transport`` sends it (slots, rate limits, retries), and the stored form
  goes into the cache with the status the client gives it (``refused`` and ``truncated`` answers
  are recorded as such); a request that fails for good is recorded as ``error`` (never served) and
  raises ``RequestFailed``. ``FatalEndpointError`` propagates and stops the build.

Endpoints are keyed by role: the generator and the companion writers share the generator's
endpoint (its ``max_concurrency`` is the endpoint's, whoever asks), each classifier has its own.
An endpoint in batch mode (``use_batch``) parks its misses for the Batch API instead of sending
them (``bsafe_data.llm.batch``); its answers take the same path into the cache. An engine with
such an endpoint counts its tasks, and the flow says when it is ``idle``: together they tell when a
round of batches is due. ``BatchOptions`` say where batch state lives (a build's work folder).
``snapshot`` gives every endpoint's counters (done, in flight, queued, failed, cache hits, the wait
under way) for progress displays.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from bsafe_data.llm.batch import BatchHub, BatchOptions, BatchQueue
from bsafe_data.llm.breaker import AnswerCheck
from bsafe_data.llm.cache import CachedResponse, ResponseCache
from bsafe_data.llm.errors import RequestFailed
from bsafe_data.llm.transport import PRIORITY, Transport

T = TypeVar("T")

#: answers kept in memory after they were fetched (the cache's writer commits them within ~50 ms)
_RECENT = 4096


@dataclass(slots=True)
class Reply:
    """An answer as the cache stores it: the text the client parses, and its bookkeeping."""

    text: str
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    #: HTTP requests spent on it (0: served from the cache or by an identical call)
    attempts: int = 0
    cached: bool = False


def _ok(reply: Reply) -> str:
    return "ok"


@dataclass(frozen=True)
class Batched:
    """How calls of one kind share a request (``/moderations`` takes a list of inputs): up to
    ``size`` calls whose ``item``s are joined by ``body`` into one request body, whose 200 answer
    ``split`` reads into one ``Reply`` per item (in order; raises on a malformed body)."""

    size: int
    item: Any
    body: Callable[[list[Any]], bytes]
    split: Callable[[bytes], list[Reply]]


@dataclass(frozen=True)
class Call:
    """One request: where, the canonical body (as sent and hashed), its cache key, and how to read
    a 200 body (``extract``: raises on a malformed one, which is retried) and store it (``status``:
    the cache status of a reply; only ``ok`` and ``refused`` are served later). With ``batched``
    the call is cached on its own but sent together with others (``body``/``extract`` unused)."""

    path: str
    body: bytes
    key: str
    model: str
    extract: Callable[[bytes], Reply]
    status: Callable[[Reply], str] = _ok
    est_tokens: int = 0
    batched: Batched | None = None
    #: whether a cached answer can be read (a damaged entry is a miss: asked again, replaced)
    readable: Callable[[Reply], bool] | None = None


@dataclass
class EndpointCounters:
    """What an endpoint did so far (read from any thread for progress)."""

    done: int = 0  # calls answered (by the endpoint or the cache)
    cache_hits: int = 0
    failed: int = 0  # calls that failed for good


class Endpoint:
    """One model endpoint of a build: its transport and the cache loop of its calls."""

    def __init__(self, engine: Engine, transport: Transport):
        self.engine = engine
        self.transport = transport
        self.counters = EndpointCounters()
        self.check = AnswerCheck(0, 1.0)  # the generator's judges its first answers (llm/breaker.py)
        self._inflight: dict[str, asyncio.Task[Reply]] = {}
        self._batch: list[tuple[Call, asyncio.Future[tuple[Reply, int]]]] = []
        #: the Batch API queue of an endpoint in batch mode (``Engine.use_batch``)
        self.batch: BatchQueue | None = None

    @property
    def role(self) -> str:
        """Who talks to it (``generator``, ``classifier 'guard'``)."""
        return self.transport.role

    async def ask(self, call: Call) -> Reply:
        """The answer to ``call``: from the cache, from an identical call in flight, or fetched."""
        counters = self.counters
        hit = self.engine.lookup(call.key)
        if hit is not None and (call.readable is None or call.readable(hit)):
            counters.done += 1
            counters.cache_hits += 1
            return hit
        task = self._inflight.get(call.key)
        joined = task is not None
        if task is None:
            task = asyncio.ensure_future(self._fetch(call))
            self._inflight[call.key] = task
            task.add_done_callback(lambda _: self._inflight.pop(call.key, None))
        hub = self.batch.hub if self.batch is not None and call.batched is None else None
        if hub is not None:
            hub.park()
        try:
            reply = await asyncio.shield(task)
        except RequestFailed:
            counters.failed += 1
            raise
        finally:
            if hub is not None:
                hub.unpark()
        counters.done += 1
        if joined:  # answered by the identical call's request: no request of its own
            counters.cache_hits += 1
            return replace(reply, attempts=0, cached=True)
        return reply

    async def _send(self, call: Call) -> tuple[Reply, int]:
        if call.batched is None:
            hub = self.engine.batches
            found = None if hub is None else hub.imported(call.key)
            if found is not None:
                return _from_batch(call, found.result())
            if self.batch is not None:
                return _from_batch(call, await self.batch.send(call.key, call.path, call.body))
            return await self.transport.send(call.path, call.body, call.extract, call.est_tokens)
        waiter: asyncio.Future[tuple[Reply, int]] = asyncio.get_running_loop().create_future()
        self._batch.append((call, waiter))
        if len(self._batch) == 1:  # the first of a batch sends it once the others queued up
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._send_batch()))
        elif len(self._batch) >= call.batched.size:
            asyncio.ensure_future(self._send_batch())
        return await waiter

    async def _send_batch(self) -> None:
        if not self._batch:
            return
        size = self._batch[0][0].batched.size  # type: ignore[union-attr]
        taken, self._batch = self._batch[:size], self._batch[size:]
        if self._batch:
            asyncio.ensure_future(self._send_batch())
        first = taken[0][0]
        spec = first.batched
        assert spec is not None
        body = spec.body([call.batched.item for call, _ in taken])  # type: ignore[union-attr]

        def split(raw: bytes) -> list[Reply]:
            replies = spec.split(raw)
            if len(replies) != len(taken):
                raise ValueError(f"{len(replies)} results for {len(taken)} inputs")
            return replies

        try:
            replies, attempts = await self.transport.send(first.path, body, split)
        except Exception as exc:
            for _, waiter in taken:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for (_, waiter), reply in zip(taken, replies, strict=True):
            if not waiter.done():
                waiter.set_result((reply, attempts))

    async def _fetch(self, call: Call) -> Reply:
        cache = self.engine.cache
        try:
            reply, attempts = await self._send(call)
        except RequestFailed as exc:
            cache.put(call.key, model=call.model, status="error", text="", detail=exc.reason)
            raise
        reply.attempts = attempts
        transport = self.transport
        transport.stats.input_tokens += reply.input_tokens
        transport.stats.output_tokens += reply.output_tokens
        if call.est_tokens and self.batch is None:  # correct the TPM reservation with the reported usage
            transport.limiter.settle(call.est_tokens, reply.input_tokens + reply.output_tokens)
        cache.put(
            call.key,
            model=call.model,
            status=call.status(reply),
            text=reply.text,
            finish_reason=reply.finish_reason,
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
        )
        self.engine.remember(call.key, call.status(reply), reply)
        return reply


@dataclass
class Engine:
    """The event loop, the response cache and the endpoints of a build (see the module docstring).

    Nothing starts until the first ``endpoint`` or ``submit``; ``close`` stops the calls in flight,
    closes the connections and commits the cache.
    """

    cache_dir: Path | None = None
    #: batch state and settings (None: endpoints in batch mode keep no state to re-attach to)
    batch: BatchOptions | None = None
    _endpoints: dict[str, Endpoint] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _cache: ResponseCache | None = None
    _recent: OrderedDict[str, Reply] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _hub: BatchHub | None = None

    def __post_init__(self) -> None:
        if self.batch is not None:
            self._hub = BatchHub(self.batch)

    @property
    def batches(self) -> BatchHub | None:
        """The batch queues of this engine (None: made without ``BatchOptions`` and no endpoint
        in batch mode)."""
        return self._hub

    @property
    def exporting(self) -> bool:
        """Whether every LLM endpoint's calls go to a file for an offline engine."""
        return self._hub is not None and self._hub.exporting

    def use_batch(self, endpoint: Endpoint, api_key_env: str) -> None:
        """Put ``endpoint`` in batch mode (``api_key_env`` is recorded in the batch state files),
        before any task is submitted: tasks are counted from then on."""
        with self._lock:
            if self._hub is None:
                self._hub = BatchHub(BatchOptions())
            hub = self._hub
        if endpoint.batch is None:
            transport = endpoint.transport
            endpoint.batch = hub.queue(
                endpoint.role, transport.base_url, transport.api_key, transport.public, api_key_env
            )

    def idle(self) -> None:
        """The caller cannot go on until answers come (from any thread but the loop's)."""
        hub, loop = self._hub, self._loop
        if hub is not None and hub.queues and loop is not None:
            loop.call_soon_threadsafe(hub.idle, hub.idle_mark())

    @property
    def cache(self) -> ResponseCache:
        """The response cache (opened on first use; used on the loop's thread only)."""
        if self._cache is None:
            self._cache = ResponseCache(self.cache_dir, background=True)
        return self._cache

    def endpoint(self, role: str, make: Callable[[], Transport]) -> Endpoint:
        """The endpoint of ``role``, made with ``make()`` the first time it is asked for."""
        with self._lock:
            found = self._endpoints.get(role)
            if found is None:
                found = self._endpoints[role] = Endpoint(self, make())
            return found

    # -- the cache loop's memory ---------------------------------------------------------------
    def lookup(self, key: str) -> Reply | None:
        """A served answer for ``key``: fetched moments ago, or in the cache."""
        recent = self._recent.get(key)
        if recent is not None:
            return Reply(
                recent.text, recent.finish_reason, recent.input_tokens, recent.output_tokens, 0, True
            )
        hit = self.cache.get(key)
        return None if hit is None else _reply(hit)

    def remember(self, key: str, status: str, reply: Reply) -> None:
        """Keep a fresh served answer in memory until the cache's writer has surely committed it."""
        if status in ("ok", "refused"):
            self._recent[key] = reply
            if len(self._recent) > _RECENT:
                self._recent.popitem(last=False)

    # -- running coroutines --------------------------------------------------------------------
    def submit(self, coro: Coroutine[Any, Any, T], priority: int = 0) -> Future[T]:
        """Run ``coro`` on the engine's loop; its requests wait for slots by ``priority`` (lower
        first). Returns at once."""
        loop = self._running_loop()
        hub = self._hub
        if hub is None or not hub.queues:  # no endpoint in batch mode: nothing to count
            return asyncio.run_coroutine_threadsafe(_prioritised(coro, priority), loop)
        hub.started()
        future = asyncio.run_coroutine_threadsafe(_prioritised(coro, priority), loop)

        def finished(_: Future[T]) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(hub.finished)

        future.add_done_callback(finished)
        return future

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """``submit`` and wait for the result (from any thread but the loop's); the answers it
        fetched are committed to the cache when it returns."""
        future = self.submit(coro)
        self.idle()  # this thread waits: nothing else will be asked meanwhile
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise
        finally:
            if self._cache is not None:
                self._cache.flush()

    def gather(self, coros: list[Coroutine[Any, Any, T]]) -> list[T]:
        """Run coroutines concurrently on the loop and wait for all their results, in order."""
        if not coros:
            return []

        async def all_of() -> list[T]:
            return list(await asyncio.gather(*coros))

        return self.run(all_of())

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="bsafe-engine", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    # -- progress ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per endpoint (by role): done, cache hits, failed, in flight, queued, requests sent
        (retries included), the URL, and the longest wait under way (``wait``: what, seconds)."""
        out = {}
        for role, endpoint in list(self._endpoints.items()):
            transport, counters = endpoint.transport, endpoint.counters
            out[role] = {
                "url": transport.public,
                "done": counters.done,
                "cache_hits": counters.cache_hits,
                "failed": counters.failed,
                "in_flight": transport.in_flight,
                "queued": transport.queued,
                "requests": transport.stats.requests,
                "concurrency": transport.limit,
                "wait": transport.current_wait(),
            }
            if endpoint.batch is not None:
                out[role].update(endpoint.batch.snapshot())
        return out

    # -- closing -------------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel what is in flight, close every endpoint's connections, commit the cache."""
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
            if self._cache is not None:
                self._cache.close()
                self._cache = None

    async def _shutdown(self) -> None:
        here = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not here and not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for endpoint in self._endpoints.values():
            await endpoint.transport.close()
        if self._hub is not None:
            await self._hub.close()


async def _prioritised(coro: Awaitable[T], priority: int) -> T:
    PRIORITY.set(priority)  # this task's context: every request it sends waits by it
    return await coro


def _from_batch(call: Call, raw: bytes) -> tuple[Reply, int]:
    """A batch line's 200 body read as ``call`` reads an online one (one request)."""
    try:
        return call.extract(raw), 1
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise RequestFailed(f"malformed response in a batch output ({type(exc).__name__})", 1) from None


def _reply(hit: CachedResponse) -> Reply:
    return Reply(hit.text, hit.finish_reason, hit.input_tokens, hit.output_tokens, 0, True)
