"""The one HTTP transport to OpenAI-compatible endpoints, shared by the generator and the classifiers.

The hot path is plain aiohttp: one ``ClientSession`` with ``TCPConnector(limit=max_concurrency)``,
pre-serialised request bodies, and a parse of only the fields the caller needs (``extract``). The
``openai`` SDK is several milliseconds of CPU per request, which caps a 2-core machine far below
what a local vLLM server can deliver, so it is used only off the hot path (``check_endpoint``).

``Transport.post(path, body, extract)`` sends one request with rate limiting (``RateLimiter``) and
the package's one retry policy (``bsafe_data.llm.retry.RetryPolicy``): transient failures are
retried, ``FatalEndpointError`` stops the run, ``RequestFailed`` fails that request only. Each
attempt holds a slot (not the waits between attempts); waiting callers are served by ``PRIORITY``
(the engine sets it to the chunk's index: older chunks first), so the oldest work finishes first.
The number of slots adapts to the server between ``min_concurrency`` and ``max_concurrency``
(``llm/concurrency.py``: x0.75 on a 429, +1 after a run of successes); a 429 costs no retry while
the limit can still go down. A wait of a few seconds or more (a server's Retry-After, a backoff, a
rate-limit pause) is noted in ``wait``, for progress displays.

Endpoints are resolved in one place (``resolve_endpoint``): ``base_url`` defaults to
``$OPENAI_BASE_URL`` (then OpenAI's), and the key is read from the environment variable the recipe
names. The key lives only in the transport's session headers: never in a cache key, a message or a
``repr``.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from yarl import URL

from bsafe_data.llm.concurrency import AdaptiveLimit
from bsafe_data.llm.errors import FatalEndpointError, RequestFailed, redact
from bsafe_data.llm.ratelimit import RateLimiter
from bsafe_data.llm.retry import Fatal, Retry, RetryPolicy, is_quota_exhausted, retry_after_s

try:  # orjson is optional: about 2x faster than json on response bodies
    import orjson

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def loads(raw: bytes) -> Any:
        return json.loads(raw.decode("utf-8"))  # skips json's encoding detection on bytes


T = TypeVar("T")
ItemT = TypeVar("ItemT")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: What ``extract`` may raise on a body it cannot read: the attempt is retried like a dropped one.
_MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError)
_NO_HEADERS: dict[str, str] = {}
#: the priority of the requests a task sends (lower first; the engine sets the chunk's index)
PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("bsafe_priority", default=0)
#: waits at least this long are noted for progress displays (``Transport.wait``)
NOTED_WAIT_S = 2.0


class _Slots:
    """A semaphore of resizable size (``limit.limit``) whose waiters are served by priority (lower
    first), then in arrival order."""

    def __init__(self, limit: AdaptiveLimit):
        self.limit = limit
        self.held = 0
        self._waiters: list[tuple[int, int, asyncio.Future[int]]] = []
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot."""
        return sum(1 for *_, waiter in self._waiters if not waiter.done())

    async def acquire(self, priority: int) -> int:
        """Wait for a slot; the limit's epoch when it was granted (a throttle signal for a request
        sent on it is stale once the limit went down since)."""
        if not self._waiters and self.held < self.limit.limit:
            self.held += 1
            return self.limit.epoch
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrivals), waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        self.held -= 1
        self.fill()

    def fill(self) -> None:
        """Hand free slots (the limit may have grown) to waiters."""
        while self._waiters and self.held < self.limit.limit:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                self.held += 1
                waiter.set_result(self.limit.epoch)  # the slot goes straight to the waiter


class MalformedResponse(ValueError):
    """A 200 answer without the fields the caller needs (its text is the retry reason)."""


def public_endpoint(base_url: str) -> str:
    """``base_url`` without credentials, query or fragment: safe to print."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class Endpoint:
    """Where to send requests, and the key to send (kept out of ``repr``)."""

    base_url: str
    api_key: str = field(default="EMPTY", repr=False)

    @property
    def public(self) -> str:
        """The base URL, safe to print."""
        return public_endpoint(self.base_url)


class CredentialsInURL(ValueError):
    """A base URL carries a user name or password (they would end up in logs and manifests)."""


def has_credentials(url: str) -> bool:
    """True when ``url`` has a ``user:password@`` part."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.username is not None or parts.password is not None


def resolve_endpoint(base_url: str | None, api_key_env: str) -> Endpoint:
    """A recipe's endpoint: ``base_url``, else ``$OPENAI_BASE_URL``, else OpenAI; the key from the
    environment variable named ``api_key_env`` (``"EMPTY"`` when unset, as local servers expect).

    Raises ``CredentialsInURL`` (whose message never repeats the URL) for ``user:pass@`` URLs."""
    url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    if has_credentials(url):
        where = "base_url" if base_url else "$OPENAI_BASE_URL"
        raise CredentialsInURL(
            f"{where} holds credentials (user:password@); remove them and put the key in the "
            f"environment variable named by api_key_env ({api_key_env})"
        )
    return Endpoint(url.rstrip("/"), os.environ.get(api_key_env) or "EMPTY")


def _proxy_configured() -> bool:
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    return any(os.environ.get(name) or os.environ.get(name.lower()) for name in names)


@dataclass(slots=True)
class TransportStats:
    """Counters over the transport's lifetime (across sessions)."""

    requests: int = 0  # HTTP requests sent (retries included)
    retries: int = 0
    input_tokens: int = 0  # as reported by the server (chat completions only)
    output_tokens: int = 0
    failed: int = 0  # requests given up on (RequestFailed)


class Transport:
    """Bounded, rate-limited, retrying HTTP client for one OpenAI-compatible endpoint.

    ``role`` names the caller in fatal errors (``"generator"``, ``"classifier 'guard'"``). Use it
    only inside the event loop that called ``open()`` (or ``async with transport:``); the counters
    in ``stats`` and the rate limiter outlive ``close()``, so one transport can serve many loops.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str = "EMPTY",
        *,
        role: str = "generator",
        max_concurrency: int = 64,
        min_concurrency: int | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 6,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        max_retry_after_s: float = 120.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.role = role
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.policy = RetryPolicy(
            max_retries=max_retries,
            base_s=backoff_base_s,
            max_s=backoff_max_s,
            max_hint_s=max_retry_after_s,
            fail_long_hints=True,
        )
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        #: the adaptive concurrency limit (fixed when ``min_concurrency`` is None or the maximum)
        self.concurrency = AdaptiveLimit(max_concurrency, min_concurrency)
        self.stats = TransportStats()
        #: the longest wait under way, for progress displays: (what, monotonic end), or None
        self.wait: tuple[str, float] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._routes: dict[str, tuple[URL, str]] = {}
        self._slots: _Slots | None = None  # made with each session: waiters belong to its loop

    @property
    def public(self) -> str:
        """The base URL, safe to print."""
        return public_endpoint(self.base_url)

    @property
    def api_key(self) -> str:
        """The key sent as the bearer token (for the one-off SDK check; never printed)."""
        return self._api_key

    @property
    def in_flight(self) -> int:
        """Requests holding a slot now (sent, waiting for an answer or a retry)."""
        slots = self._slots
        return 0 if slots is None else slots.held

    @property
    def limit(self) -> int:
        """The concurrency limit now (``max_concurrency`` until the server throttles)."""
        return self.concurrency.limit

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return 0 if self._slots is None else self._slots.waiting

    def route(self, path: str) -> tuple[URL, str]:
        """The parsed URL of ``path`` (parsed once, not per request) and its printable form."""
        found = self._routes.get(path)
        if found is None:
            url = self.base_url + path
            found = self._routes[path] = (URL(url), public_endpoint(url))
        return found

    # -- session -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Create the HTTP session (inside the running loop)."""
        if self._session is not None and not self._session.closed:
            return
        self._slots = _Slots(self.concurrency)
        connector = aiohttp.TCPConnector(limit=self.max_concurrency, limit_per_host=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, connect=min(self.timeout_s, 30.0)),
            headers={"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"},
            cookie_jar=aiohttp.DummyCookieJar(),  # APIs set no cookies we need; skips per-request work
            raise_for_status=False,
            # proxies from the environment, as the openai SDK does; aiohttp reads the environment on
            # every request when this is on, so only when a proxy variable is actually set
            trust_env=_proxy_configured(),
        )

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Transport:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests ------------------------------------------------------------------------------
    async def run(
        self, items: Iterable[ItemT], handler: Callable[[ItemT], Awaitable[None]], total: int | None = None
    ) -> None:
        """Call ``handler`` on every item, at most ``max_concurrency`` at once (the handlers' requests
        take the transport's slots). The first exception cancels the others and propagates."""
        items = list(items)
        if not items:
            return
        await self.open()
        source = iter(items)

        async def worker() -> None:
            for item in source:  # shared iterator: each item is taken by exactly one worker
                await handler(item)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(len(items), self.max_concurrency))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def post(self, path: str, body: bytes, extract: Callable[[bytes], T], est_tokens: int = 0) -> T:
        """POST ``body`` to ``path`` (under the base URL) and return ``extract`` of the 200 body.

        ``extract`` gets the raw body; a body it cannot read (``MalformedResponse`` or any
        ``ValueError``/``KeyError``/``TypeError``/``IndexError``) is retried like a dropped
        connection. ``est_tokens`` reserves that many tokens with a TPM limit.
        """
        value, _ = await self.send(path, body, extract, est_tokens)
        return value

    async def send(
        self, path: str, body: bytes, extract: Callable[[bytes], T], est_tokens: int = 0
    ) -> tuple[T, int]:
        """``post``, also returning the number of HTTP attempts it took. Each attempt holds a slot
        (served by ``PRIORITY``); waits between attempts hold none. A throttled attempt (429) costs
        no retry while the adaptive limit can still go down (``AdaptiveLimit.throttle``)."""
        await self.open()
        session, slots = self._session, self._slots
        assert session is not None and slots is not None
        url, endpoint = self.route(path)
        limiter, stats, policy, limit = self.limiter, self.stats, self.policy, self.concurrency
        priority = PRIORITY.get()
        attempt = free = 0
        while True:
            attempt += 1
            epoch = await slots.acquire(priority)
            status: int | None = None
            try:
                if not limiter.idle():
                    self._note_wait("paused by the server's rate limit", limiter.paused_until)
                    await limiter.acquire(est_tokens)
                stats.requests += 1
                async with session.post(url, data=body) as resp:
                    status = resp.status
                    raw = await _read_capped(resp, MAX_BODY_BYTES)
                    headers = resp.headers
            except BodyTooLarge as exc:  # a server ignoring max_tokens: asking again gets the same
                stats.failed += 1
                raise RequestFailed(str(exc), attempt, final=True) from None
            except asyncio.TimeoutError:
                reason = f"timeout after {self.timeout_s:g} s"
            except (aiohttp.ClientError, OSError) as exc:
                reason = f"connection error ({type(exc).__name__})"
            finally:
                slots.release()
            if status == 200:
                try:
                    value = extract(raw)
                except _MALFORMED as exc:
                    status = None
                    malformed = isinstance(exc, MalformedResponse)
                    reason = str(exc) if malformed else f"malformed response ({type(exc).__name__})"
                else:
                    if limiter.observe(headers, est_tokens):  # a spent budget throttles like a 429
                        limit.throttle(epoch)
                    else:
                        limit.succeeded(bool(slots._waiters))
                        slots.fill()
                    return value, attempt
            if status is None:
                decision = policy.decide(None, reason, _NO_HEADERS, attempt - free)
            else:
                message = self._error_message(raw)
                if status == 429 and not is_quota_exhausted(message) and limit.throttle(epoch):
                    free += 1
                decision = policy.decide(status, message, headers, attempt - free)
                hint = retry_after_s(headers)
                if status == 429 and not isinstance(decision, Fatal) and (hint or 0) <= policy.max_hint_s:
                    # the server throttles every request: hold all back (a longer hint fails instead)
                    pause = hint if hint is not None else policy.backoff(attempt)
                    limiter.pause_for(pause, policy.max_hint_s)
                limiter.observe(headers, est_tokens)
            if isinstance(decision, Retry):
                stats.retries += 1
                what = f"retrying after {decision.reason}"
                if decision.hint_s is not None:
                    what += f" (the server asked for {decision.hint_s:,.0f} s)"
                self._note_wait(what, time.monotonic() + decision.delay_s)
                await asyncio.sleep(decision.delay_s)
                continue
            if isinstance(decision, Fatal):
                raise FatalEndpointError(self.role, endpoint, decision.status, decision.message)
            stats.failed += 1
            raise RequestFailed(decision.reason, attempt, final=decision.final)

    def _note_wait(self, what: str, until: float) -> None:
        """Remember a long wait (the one that ends last) for progress displays."""
        if until - time.monotonic() >= NOTED_WAIT_S and (self.wait is None or until > self.wait[1]):
            self.wait = (what, until)

    def current_wait(self) -> tuple[str, float] | None:
        """(what, seconds left) of the longest wait under way, if any."""
        if self.wait is None:
            return None
        left = self.wait[1] - time.monotonic()
        if left <= 0:
            self.wait = None
            return None
        return self.wait[0], left

    def _error_message(self, raw: bytes) -> str:
        """The server's error message (redacted, shortened), for error reports."""
        try:
            data = loads(raw)
            error = data.get("error", data) if isinstance(data, dict) else data
            message = error.get("message", "") if isinstance(error, dict) else str(error)
        except ValueError:
            message = raw[:300].decode("utf-8", "replace")
        return redact(str(message), self._api_key)


#: Largest response body accepted: more is a server ignoring ``max_tokens`` (or not an LLM API).
MAX_BODY_BYTES = 8 << 20


class BodyTooLarge(Exception):
    """A response body over ``MAX_BODY_BYTES``; the request fails without a retry."""


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or BodyTooLarge as soon as it passes ``limit`` bytes."""
    if resp.content_length is not None:
        if resp.content_length > limit:
            raise BodyTooLarge(f"response body of {resp.content_length:,} bytes is over {limit:,}")
        return await resp.read()
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"response body is over {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
