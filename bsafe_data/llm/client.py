"""A lean async engine for OpenAI-compatible ``/chat/completions`` endpoints.

The hot path is plain aiohttp: one ``ClientSession`` with ``TCPConnector(limit=max_concurrency)``,
pre-serialised request bodies, and a JSON parse of only the fields the generator needs. The
``openai`` SDK is several milliseconds of CPU per request, which caps a 2-core machine far below
what a local vLLM server can deliver, so it is used only off the hot path (``check_endpoint``).

``ChatEngine.run`` is a worker pool of ``max_concurrency`` coroutines; each worker handles one item
at a time, so at most ``max_concurrency`` requests are in flight. ``ChatEngine.complete`` sends one
request with rate limiting and retries:

* retried with exponential backoff and jitter (honouring ``Retry-After`` / ``retry-after-ms``):
  408, 409, 425, 429, 5xx, connection errors, timeouts and malformed 200 responses;
* ``FatalEndpointError`` (no retry, the run stops): 400, 401, 403, 404, except a 400 about the
  prompt's context length, which only fails its row;
* ``RequestFailed`` (that row fails with ``generator_error``): other 4xx, or retries exhausted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from yarl import URL

from bsafe_data.llm.errors import FatalEndpointError, RequestFailed, redact
from bsafe_data.llm.ratelimit import RateLimiter
from bsafe_data.llm.retry import (
    FATAL_STATUSES,
    backoff_s,
    is_quota_exhausted,
    is_retryable_status,
    is_row_level_400,
    retry_after_s,
)

try:  # orjson is optional: about 2x faster than json on response bodies
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def _loads(raw: bytes) -> Any:
        return json.loads(raw.decode("utf-8"))  # skips json's encoding detection on bytes


__all__ = ["ChatEngine", "Completion", "FatalEndpointError", "RequestFailed", "public_endpoint"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def public_endpoint(base_url: str) -> str:
    """``base_url`` without credentials, query or fragment: safe to print."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _proxy_configured() -> bool:
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    return any(os.environ.get(name) or os.environ.get(name.lower()) for name in names)


@dataclass(slots=True)
class Completion:
    """The parts of a chat completion the generator uses."""

    text: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    attempts: int = 1  # HTTP requests spent on it, retries included


@dataclass(slots=True)
class EngineStats:
    """Counters over the engine's lifetime."""

    requests: int = 0  # HTTP requests sent (retries included)
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    failed: int = 0  # requests given up on (RequestFailed)


def parse_completion(raw: bytes) -> Completion:
    """Extract text, finish_reason and usage from a response body; ``ValueError`` if malformed."""
    try:
        data = _loads(raw)
        choice = data["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") or ""
        finish = choice.get("finish_reason")
        if message.get("refusal"):  # OpenAI's structured refusal field
            finish = "content_filter"
        usage = data.get("usage") or {}
        n_in = int(usage.get("prompt_tokens") or 0)
        n_out = int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed response ({type(exc).__name__})") from None
    if not isinstance(text, str):
        raise ValueError("malformed response (content is not a string)")
    return Completion(text, finish, n_in, n_out)


class ChatEngine:
    """Bounded, rate-limited, retrying client for one OpenAI-compatible endpoint.

    Create it, then use it only inside the event loop that called ``open()``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str = "EMPTY",
        *,
        max_concurrency: int = 64,
        timeout_s: float = 60.0,
        max_retries: int = 6,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self._url = URL(self.url)  # parsed once, not per request
        self.endpoint = public_endpoint(self.url)
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        self.stats = EngineStats()
        self._session: aiohttp.ClientSession | None = None

    @property
    def tracks_tokens(self) -> bool:
        """True when callers should pass a token estimate to ``complete`` (a TPM limit is set)."""
        return self.limiter.tracks_tokens

    async def open(self) -> None:
        """Create the HTTP session (inside the running loop)."""
        if self._session is not None and not self._session.closed:
            return
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

    async def run(
        self, items: Iterable[T], handler: Callable[[T], Awaitable[None]], total: int | None = None
    ) -> None:
        """Call ``handler`` on every item with at most ``max_concurrency`` running at once.

        ``items`` is consumed lazily (pass ``total`` to avoid starting idle workers). The first
        exception (e.g. ``FatalEndpointError``) cancels the other workers and propagates.
        """
        if total is None:
            items = list(items)
            total = len(items)
        if total == 0:
            return
        source = iter(items)

        async def worker() -> None:
            for item in source:  # shared iterator: each item is taken by exactly one worker
                await handler(item)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(total, self.max_concurrency))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def complete(self, body: bytes, est_tokens: int = 0) -> Completion:
        """POST one pre-serialised chat-completions body, with rate limiting and retries."""
        if self._session is None:
            await self.open()
        session = self._session
        assert session is not None
        limiter = self.limiter
        stats = self.stats
        attempt = 0
        while True:
            attempt += 1
            if not limiter.idle():
                await limiter.acquire(est_tokens)
            stats.requests += 1
            hint: float | None = None
            try:
                async with session.post(self._url, data=body) as resp:
                    status = resp.status
                    raw = await resp.read()
                    headers = resp.headers
            except asyncio.TimeoutError:
                reason = f"timeout after {self.timeout_s:g} s"
            except (aiohttp.ClientError, OSError) as exc:
                reason = f"connection error ({type(exc).__name__})"
            else:
                if status == 200:
                    try:
                        done = parse_completion(raw)
                    except ValueError as exc:
                        reason = str(exc)
                    else:
                        done.attempts = attempt
                        stats.input_tokens += done.input_tokens
                        stats.output_tokens += done.output_tokens
                        if est_tokens:
                            limiter.settle(est_tokens, done.input_tokens + done.output_tokens)
                        limiter.observe(headers, est_tokens)
                        return done
                else:
                    message = self._error_message(raw)
                    if status in FATAL_STATUSES and not (status == 400 and is_row_level_400(message)):
                        raise FatalEndpointError(self.endpoint, status, message)
                    if status == 429 and is_quota_exhausted(message):  # billing, not rate: no retry helps
                        raise FatalEndpointError(self.endpoint, status, message)
                    if not is_retryable_status(status):
                        stats.failed += 1
                        raise RequestFailed(
                            f"HTTP {status}: {message}" if message else f"HTTP {status}", attempt
                        )
                    reason = f"HTTP {status}"
                    hint = retry_after_s(headers)
                    if status == 429:
                        limiter.pause_for(
                            hint if hint is not None else backoff_s(attempt, self.backoff_base_s)
                        )
                    limiter.observe(headers, est_tokens)
            if attempt > self.max_retries:
                stats.failed += 1
                raise RequestFailed(f"{reason}; gave up after {attempt} attempts", attempt)
            stats.retries += 1
            await asyncio.sleep(backoff_s(attempt, self.backoff_base_s, self.backoff_max_s, hint))

    def _error_message(self, raw: bytes) -> str:
        """The server's error message (redacted, shortened), for error reports."""
        try:
            data = _loads(raw)
            error = data.get("error", data) if isinstance(data, dict) else data
            message = error.get("message", "") if isinstance(error, dict) else str(error)
        except ValueError:
            message = raw[:300].decode("utf-8", "replace")
        return redact(str(message), self._api_key)


async def check_endpoint(
    base_url: str, api_key: str, model: str, timeout_s: float = 30.0
) -> list[str] | None:
    """Ask ``GET /models`` through the ``openai`` SDK before the first batch.

    Raises ``FatalEndpointError`` when the key is rejected (401/403) or the endpoint cannot be
    reached. A 404 (servers without ``/models``) skips the check. A model missing from the list is
    only logged: the first chat request reports a wrong model as a fatal 404 anyway. Returns the
    served model ids, or ``None`` when the check was skipped.
    """
    import openai

    endpoint = public_endpoint(base_url)
    client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=1)
    try:
        page = await client.models.list()
        ids = [m.id for m in page.data]
    except openai.NotFoundError:
        return None
    except openai.APIStatusError as exc:
        message = redact(str(getattr(exc, "message", "") or ""), api_key)
        if exc.status_code in (401, 403):
            raise FatalEndpointError(endpoint, exc.status_code, message) from None
        log.warning("%s: GET /models returned HTTP %s; skipping the model check", endpoint, exc.status_code)
        return None
    except openai.APITimeoutError:
        raise FatalEndpointError(endpoint, None, f"no answer to GET /models within {timeout_s:g} s") from None
    except openai.APIConnectionError:
        raise FatalEndpointError(endpoint, None, "cannot connect") from None
    finally:
        await client.close()
    if ids and model not in ids:
        shown = ", ".join(ids[:8]) + (", …" if len(ids) > 8 else "")
        log.warning("%s does not list model %r (it serves: %s)", endpoint, model, shown)
    return ids
