"""The one retry policy of every endpoint the package talks to (generator, classifiers, the Hub).

``RetryPolicy.decide`` turns one failed attempt into ``Retry`` (wait ``delay_s``, then try again),
``Fatal`` (the endpoint, key or model is wrong: stop the run) or ``Fail`` (give up on this request
only). The same rules hold for every caller:

* no answer (timeout, connection error) or a malformed body: retried;
* 408, 409, 425, 429 and every 5xx (plus a caller's ``extra_retry_statuses``): retried with
  exponential backoff and jitter, at least as long as ``Retry-After`` / ``retry-after-ms`` asks;
* a server hint is honoured up to ``max_hint_s``; with ``fail_long_hints`` (model endpoints: the
  recipe's ``max_retry_after_s``, default 120 s) a longer one is not waited out: the request fails
  as transient (a re-run retries it), so a server that asks for hours never holds a build silently;
* 400, 401, 403, 404: fatal, except a 400 about one prompt's context length (``Fail``);
* a 429 that means the quota or credit is exhausted: fatal (waiting cannot help);
* any other status, or retries exhausted: ``Fail``. A ``Fail`` is ``final`` when the endpoint
  answered this request with a non-retryable status (the 400 about context length, 413, 422, ...):
  asking again gets the same answer, so a re-run does not retry it. Retries exhausted is not final.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

#: HTTP statuses that stop the whole run: the endpoint, key or model is wrong.
FATAL_STATUSES = frozenset({400, 401, 403, 404})
#: HTTP statuses worth another attempt.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})

_CONTEXT_LENGTH = re.compile(r"context[_ ]length|maximum context|too many tokens|prompt is too long", re.I)


def is_retryable_status(status: int) -> bool:
    """True for 408/409/425/429 and every 5xx."""
    return status in RETRY_STATUSES or 500 <= status < 600


def is_row_level_400(body: str) -> bool:
    """A 400 that concerns one prompt only (context length exceeded), not the endpoint."""
    return bool(_CONTEXT_LENGTH.search(body))


_QUOTA = re.compile(r"insufficient_quota|exceeded your current quota|quota exceeded|billing", re.I)


def is_quota_exhausted(body: str) -> bool:
    """A 429 that means "out of credit" (OpenAI ``insufficient_quota``): retrying cannot help."""
    return bool(_QUOTA.search(body))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """``headers[name]`` for a lower-case ``name``; HTTP clients' header maps ignore case, plain
    dicts are searched."""
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Delay the server asked for: ``retry-after-ms`` first, then ``Retry-After`` (seconds or date)."""
    ms = _header(headers, "retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = _header(headers, "retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(value: str | None) -> float | None:
    """Parse rate-limit reset values such as ``"1s"``, ``"6m0s"``, ``"20ms"`` or ``"0.5"``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


def backoff_s(
    attempt: int,
    base_s: float = 0.5,
    max_s: float = 60.0,
    hint_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Wait before retry number ``attempt`` (1-based).

    Exponential backoff with "equal jitter" (half fixed, half random). A server hint
    (``Retry-After``) is honoured as a minimum, plus up to 10% jitter so that clients that were
    throttled together do not return together. Hints are capped at 10 minutes.
    """
    rand = (rng or random).random()
    if hint_s is not None:
        hint_s = min(hint_s, 600.0)
        return hint_s + hint_s * 0.1 * rand
    exp = min(max_s, base_s * (2 ** (attempt - 1)))
    return exp / 2 + exp / 2 * rand


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay_s`` seconds; ``hint_s`` is the delay the server asked for, if any."""

    delay_s: float
    reason: str
    hint_s: float | None = None


@dataclass(frozen=True, slots=True)
class Fatal:
    """Stop the run: the endpoint refuses every request (``status`` None: it cannot be reached)."""

    status: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Fail:
    """Give up on this request only (``reason`` says why and after how many attempts); ``final``:
    the endpoint refused this very request, so a re-run would get the same answer."""

    reason: str
    final: bool = False


_NO_HEADERS: Mapping[str, str] = {}


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are retried, how often and how long to wait (see the module docstring)."""

    max_retries: int = 6  # attempts after the first one
    base_s: float = 0.5  # first backoff step
    max_s: float = 60.0  # longest backoff step (without a server hint)
    max_hint_s: float = 120.0  # longest server-requested wait honoured
    fail_long_hints: bool = False  # a longer hint fails the request (else the wait is capped)
    fatal_statuses: frozenset[int] = FATAL_STATUSES
    extra_retry_statuses: frozenset[int] = frozenset()

    def retryable(self, status: int) -> bool:
        """True for the statuses worth another attempt."""
        return is_retryable_status(status) or status in self.extra_retry_statuses

    def decide(
        self,
        status: int | None,
        message: str = "",
        headers: Mapping[str, str] = _NO_HEADERS,
        attempt: int = 1,
    ) -> Retry | Fatal | Fail:
        """The verdict on attempt number ``attempt`` (1-based).

        ``status`` is the HTTP status of the answer, or None when there was no usable answer
        (timeout, connection error, malformed body); ``message`` is the server's error message
        (or, with no status, the reason there was no answer); ``headers`` the response headers.
        """
        hint: float | None = None
        if status is None:
            reason = message or "no answer"
        else:
            if status in self.fatal_statuses and not (status == 400 and is_row_level_400(message)):
                return Fatal(status, message)
            if status == 429 and is_quota_exhausted(message):  # billing, not rate: no retry helps
                return Fatal(status, message)
            if not self.retryable(status):
                return Fail(f"HTTP {status}: {message}" if message else f"HTTP {status}", final=True)
            reason = f"HTTP {status}"
            hint = retry_after_s(headers)
            if self.fail_long_hints and hint is not None and hint > self.max_hint_s:
                return Fail(
                    f"{reason}: the server asked to wait {hint:,.0f} s (Retry-After), more than "
                    f"max_retry_after_s={self.max_hint_s:g}"
                )
        if attempt > self.max_retries:
            return Fail(f"{reason}; gave up after {attempt} attempts")
        return Retry(self.backoff(attempt, hint), reason, hint)

    def backoff(self, attempt: int, hint_s: float | None = None) -> float:
        """The wait before retry number ``attempt``: ``backoff_s`` with this policy's limits."""
        capped = None if hint_s is None else min(hint_s, self.max_hint_s)
        return backoff_s(attempt, self.base_s, self.max_s, capped)
