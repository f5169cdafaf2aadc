"""Errors raised by the LLM engine.

``FatalEndpointError`` stops a run early (bad key, wrong URL, unknown model): the CLI prints its
message and exits without a traceback. ``RequestFailed`` concerns one request only (retries
exhausted, or a non-retryable per-request problem such as an over-long prompt); the generator turns
it into ``error="generator_error"`` for that row and the run goes on.
"""

from __future__ import annotations

import re

_KEY_LIKE = re.compile(r"\b(sk|pk|rk|hf|gsk|xai)[-_][A-Za-z0-9_\-*]{6,}")


def redact(text: str, secret: str | None = None, limit: int = 300) -> str:
    """Remove an API key (and anything shaped like one) from a server message; shorten it."""
    if secret and secret != "EMPTY" and len(secret) >= 4:
        text = text.replace(secret, "***")
    text = _KEY_LIKE.sub(lambda m: m.group(1) + "-***", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class FatalEndpointError(RuntimeError):
    """The endpoint refuses every request (401/403/404/400 or unreachable): stop the run."""

    def __init__(self, endpoint: str, status: int | None, message: str = ""):
        self.endpoint = endpoint
        self.status = status
        self.message = message
        what = f"HTTP {status}" if status is not None else "error"
        text = f"generator endpoint {endpoint} failed: {what}"
        if message:
            text += f": {message}"
        super().__init__(text)


class RequestFailed(Exception):
    """One request failed for good (retries exhausted or a non-retryable per-request status)."""

    def __init__(self, reason: str, attempts: int = 1):
        self.reason = reason
        self.attempts = attempts
        super().__init__(reason)
