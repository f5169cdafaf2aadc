"""Retry policy: which failures are retried, and how long to wait before the next attempt."""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Mapping

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


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Delay the server asked for: ``retry-after-ms`` first, then ``Retry-After`` (seconds or date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
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
