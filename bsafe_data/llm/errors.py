"""Errors raised by the endpoint transport (``bsafe_data.llm.transport``).

``FatalEndpointError`` stops a run early (bad key, wrong URL, unknown model): the CLI prints its
message, which names the role (generator, classifier, hub) and the endpoint, and exits without a
traceback. ``RequestFailed`` concerns one request only (retries exhausted, or a non-retryable
per-request problem such as an over-long prompt); the generator turns it into
``error="generator_error"`` for that row, a classifier into an ``error`` score, and the run goes on.
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
    """The endpoint refuses every request (401/403/404/400, exhausted quota, unreachable): stop the run.

    ``role`` names who was talking to it: ``"generator"``, ``"classifier 'guard'"``, ``"hub"``.
    """

    def __init__(self, role: str, endpoint: str, status: int | None, message: str = ""):
        self.role = role
        self.endpoint = endpoint
        self.status = status
        self.message = message
        super().__init__(describe_failure(role, endpoint, status, message))


def describe_failure(role: str, endpoint: str, status: int | None, message: str = "") -> str:
    """``"<role> endpoint <url> failed: HTTP 401: <message>"``, the text of a fatal endpoint failure."""
    what = f"HTTP {status}" if status is not None else "error"
    text = f"{role} endpoint {endpoint} failed: {what}"
    return f"{text}: {message}" if message else text


class RequestFailed(Exception):
    """One request failed for good (retries exhausted or a non-retryable per-request status).

    ``final``: the endpoint refused this very request (``retry.Fail.final``), so a re-run would get
    the same answer and the row is not retried; otherwise the failure is transient."""

    def __init__(self, reason: str, attempts: int = 1, *, final: bool = False):
        self.reason = reason
        self.attempts = attempts
        self.final = final
        super().__init__(reason)

    @property
    def transient(self) -> bool:
        """Whether a re-run retries the row (the failure was not the endpoint's final answer)."""
        return not self.final


def failure_detail(exc: RequestFailed) -> str:
    """The rejected row's detail for a failed request: its reason, and when the endpoint's answer
    was final, that a re-run does not retry it."""
    if exc.transient:
        return exc.reason
    return f"{exc.reason} (refused by the endpoint: a re-run does not retry it)"
