"""Reading chat completions, and the one-off endpoint check made before a generator's first request.

``parse_completion`` turns a ``/chat/completions`` body into the engine's ``Reply`` (text,
finish_reason, usage); a malformed body raises ``MalformedResponse`` and is retried by the transport
(``bsafe_data.llm.retry``):

* retried with exponential backoff and jitter (honouring ``Retry-After`` / ``retry-after-ms`` up to
  ``max_retry_after_s``): 408, 409, 425, 429, 5xx, connection errors, timeouts and malformed 200s;
* ``FatalEndpointError`` (no retry, the run stops): 400, 401, 403, 404 and an exhausted quota,
  except a 400 about the prompt's context length, which only fails its row;
* ``RequestFailed`` (that row fails with ``generator_error``): other 4xx, or retries exhausted.

``check_endpoint`` asks ``GET /models`` through the ``openai`` SDK, once, off the hot path.
"""

from __future__ import annotations

import logging

from bsafe_data.llm.engine import Reply
from bsafe_data.llm.errors import FatalEndpointError, redact
from bsafe_data.llm.transport import MalformedResponse, loads, public_endpoint

log = logging.getLogger(__name__)

CHAT_PATH = "/chat/completions"


def parse_completion(raw: bytes) -> Reply:
    """Text, finish_reason and usage of a chat completion body; ``MalformedResponse`` if malformed."""
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
    return Reply(text, finish, n_in, n_out)


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
