"""Client-side rate limiting: requests and tokens per minute, plus the server's own headers.

Token buckets hold one second's worth of budget and refill at the rest of the minute's, so in any
60-second window at most the configured number of requests (tokens) leave, a fresh run included;
a run does not fire a minute's worth in its first instant. A request reserves its
estimated tokens (prompt estimate + ``max_tokens``) and the reservation is corrected with the usage
the server reports. ``x-ratelimit-remaining-*`` / ``x-ratelimit-reset-*`` headers and 429
``Retry-After`` values pause new requests until the reported reset. With no limits configured and
no pause pending, ``acquire`` costs one clock read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from bsafe_data.llm.retry import parse_duration_s

_BURST_S = 1.0
#: longest pause the server's headers can impose (a longer Retry-After fails the request instead)
MAX_PAUSE_S = 120.0


def bucket_shape(per_minute: int) -> tuple[float, float]:
    """(capacity, refill per second) of the bucket that enforces ``per_minute``.

    The k-th grant after any instant s needs capacity + rate * (t_k - s) >= k, so a 60 s window
    [s, s + 60) holds fewer than capacity + 60 * rate grants; with that sum just under
    per_minute + 1 the limit holds in every window, the first one included."""
    capacity = max(1.0, per_minute / 60.0 * _BURST_S)
    return capacity, (per_minute + 1 - capacity) / 60.0 * (1 - 1e-9)


class _Bucket:
    """A continuously refilled budget that may go into debt (large single reservations)."""

    def __init__(self, per_minute: int):
        self.capacity, self.rate = bucket_shape(per_minute)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = refilled(self.level, now - self.stamp, self.capacity, self.rate)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` (capped at capacity) is available."""
        self.refill(now)
        return wait_s(self.level, amount, self.capacity, self.rate)


def refilled(level: float, elapsed_s: float, capacity: float, rate: float) -> float:
    """A bucket's level ``elapsed_s`` after it was ``level`` (it never holds more than capacity)."""
    return min(capacity, level + elapsed_s * rate)


def wait_s(level: float, amount: float, capacity: float, rate: float) -> float:
    """Seconds until a bucket at ``level`` holds ``amount`` (capped at capacity: a larger single
    reservation goes into debt)."""
    need = min(amount, capacity) - level
    return 0.0 if need <= 0 else need / rate


class RateLimiter:
    """RPM/TPM limiter shared by all in-flight requests to one endpoint."""

    def __init__(self, requests_per_minute: int | None = None, tokens_per_minute: int | None = None):
        self._rpm = _Bucket(requests_per_minute) if requests_per_minute else None
        self._tpm = _Bucket(tokens_per_minute) if tokens_per_minute else None
        self._limited = self._rpm is not None or self._tpm is not None
        self._not_before = 0.0
        self._header_checks = 20
        self._lock: asyncio.Lock | None = None
        self.waited_s = 0.0

    @property
    def tracks_tokens(self) -> bool:
        """True when reservations need a token estimate."""
        return self._tpm is not None

    @property
    def paused_until(self) -> float:
        """The monotonic time before which no request leaves (a server's Retry-After or reset)."""
        return self._not_before

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request with ``tokens`` estimated tokens may be sent, and reserve it."""
        now = time.monotonic()
        if now < self._not_before:
            await self._sleep(self._not_before - now)
        if not self._limited:
            return
        await self._reserve(tokens)

    def idle(self) -> bool:
        """True when ``acquire`` would return at once without reserving anything (fast path)."""
        return not self._limited and time.monotonic() >= self._not_before

    async def _reserve(self, tokens: int) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # FIFO: the first waiter is served first
            while True:
                now = time.monotonic()
                wait = max(
                    self._rpm.wait_for(1, now) if self._rpm else 0.0,
                    self._tpm.wait_for(tokens, now) if self._tpm else 0.0,
                    self._not_before - now,
                )
                if wait <= 0:
                    break
                await self._sleep(wait)
            if self._rpm:
                self._rpm.level -= 1
            if self._tpm:
                self._tpm.level -= tokens

    def settle(self, reserved: int, used: int) -> None:
        """Correct a reservation with the tokens the server reports having used."""
        if self._tpm is not None:
            self._tpm.level = min(self._tpm.capacity, self._tpm.level + reserved - used)

    def pause_for(self, seconds: float, longest_s: float = MAX_PAUSE_S) -> None:
        """Hold back every new request for ``seconds`` (at most ``longest_s``): a 429's Retry-After,
        an exhausted ``x-ratelimit-remaining-*``."""
        if seconds > 0:
            self._not_before = max(self._not_before, time.monotonic() + min(seconds, longest_s))

    def observe(self, headers: Mapping[str, str], tokens: int = 0) -> bool:
        """Honour ``x-ratelimit-remaining-*`` / ``x-ratelimit-reset-*`` response headers; True when
        they say a budget is spent (new requests are paused until its reset).

        Servers that sent none in their first 20 responses (vLLM, llama.cpp) are not asked again.
        """
        if self._header_checks <= 0:
            return False
        if "x-ratelimit-remaining-requests" not in headers and "x-ratelimit-remaining-tokens" not in headers:
            self._header_checks -= 1
            return False
        self._header_checks = 1 << 62  # the server sends them: keep reading them
        spent = False
        for kind, need in (("requests", 1), ("tokens", max(1, tokens))):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            try:
                if remaining is not None and float(remaining) < need:
                    self.pause_for(parse_duration_s(headers.get(f"x-ratelimit-reset-{kind}")) or 1.0)
                    spent = True
            except ValueError:
                pass
        return spent

    async def _sleep(self, seconds: float) -> None:
        self.waited_s += seconds
        await asyncio.sleep(seconds)
