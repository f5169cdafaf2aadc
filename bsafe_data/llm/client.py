"""The chat-completions client of the generator: ``ChatEngine`` on the shared ``Transport``.

``ChatEngine.complete(body)`` is ``Transport.post("/chat/completions", body, parse_completion)``
plus token accounting (usage counters, TPM reservations corrected with the reported usage). The
transport's retry policy applies (``bsafe_data.llm.retry``):

* retried with exponential backoff and jitter (honouring ``Retry-After`` / ``retry-after-ms``):
  408, 409, 425, 429, 5xx, connection errors, timeouts and malformed 200 responses;
* ``FatalEndpointError`` (no retry, the run stops): 400, 401, 403, 404 and an exhausted quota,
  except a 400 about the prompt's context length, which only fails its row;
* ``RequestFailed`` (that row fails with ``generator_error``): other 4xx, or retries exhausted.

``check_endpoint`` asks ``GET /models`` through the ``openai`` SDK, once, off the hot path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bsafe_data.llm.errors import FatalEndpointError, RequestFailed, redact
from bsafe_data.llm.transport import (
    DEFAULT_BASE_URL,
    MalformedResponse,
    Transport,
    TransportStats,
    loads,
    public_endpoint,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "ChatEngine",
    "Completion",
    "FatalEndpointError",
    "RequestFailed",
    "TransportStats",
    "public_endpoint",
]

log = logging.getLogger(__name__)

CHAT_PATH = "/chat/completions"


@dataclass(slots=True)
class Completion:
    """The parts of a chat completion the generator uses."""

    text: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    attempts: int = 1  # HTTP requests spent on it, retries included


def parse_completion(raw: bytes) -> Completion:
    """Extract text, finish_reason and usage from a response body; ``ValueError`` if malformed."""
    try:
        data = loads(raw)
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
        raise MalformedResponse(f"malformed response ({type(exc).__name__})") from None
    if not isinstance(text, str):
        raise MalformedResponse("malformed response (content is not a string)")
    return Completion(text, finish, n_in, n_out)


class ChatEngine(Transport):
    """The transport of one ``/chat/completions`` endpoint, with token accounting.

    Create it, then use it only inside the event loop that called ``open()``.
    """

    def __init__(self, base_url: str, api_key: str = "EMPTY", **options: Any):
        """``options`` are ``Transport``'s (``max_concurrency``, ``timeout_s``, ``max_retries``, ...)."""
        super().__init__(base_url, api_key, **options)
        self.url, self.endpoint = self.base_url + CHAT_PATH, self.route(CHAT_PATH)[1]

    @property
    def tracks_tokens(self) -> bool:
        """True when callers should pass a token estimate to ``complete`` (a TPM limit is set)."""
        return self.limiter.tracks_tokens

    async def complete(self, body: bytes, est_tokens: int = 0) -> Completion:
        """POST one pre-serialised chat-completions body, with rate limiting and retries."""
        done, attempts = await self.send(CHAT_PATH, body, parse_completion, est_tokens)
        done.attempts = attempts
        stats = self.stats
        stats.input_tokens += done.input_tokens
        stats.output_tokens += done.output_tokens
        if est_tokens:
            self.limiter.settle(est_tokens, done.input_tokens + done.output_tokens)
        return done


async def check_endpoint(
    base_url: str, api_key: str, model: str, timeout_s: float = 30.0, role: str = "generator"
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
            raise FatalEndpointError(role, endpoint, exc.status_code, message) from None
        log.warning("%s: GET /models returned HTTP %s; skipping the model check", endpoint, exc.status_code)
        return None
    except openai.APITimeoutError:
        message = f"no answer to GET /models within {timeout_s:g} s"
        raise FatalEndpointError(role, endpoint, None, message) from None
    except openai.APIConnectionError:
        raise FatalEndpointError(role, endpoint, None, "cannot connect") from None
    finally:
        await client.close()
    if ids and model not in ids:
        shown = ", ".join(ids[:8]) + (", …" if len(ids) > 8 else "")
        log.warning("%s does not list model %r (it serves: %s)", endpoint, model, shown)
    return ids
