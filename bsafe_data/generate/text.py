"""Plain-text completions from the generator endpoint: a prompt and the engine.

Methods that need free text rather than the injection protocol (BSAFE's safe continuations, DeRTa's
refusals, Reset's safe answers) describe it with a ``TextPrompt`` (a system message and the cache
protocol) and ask a ``TextWriter`` for one answer per (user message, seed), on the generator's
endpoint of the build's engine (the same limits, cache, retries and fatal errors as every request;
keyed ``request_key(body, protocol)``; its answers count in the generator's answer check). Each
answer is a ``Written``: the text, or a reason code (``generator_error`` is transient unless the
endpoint refused that very request, e.g. a prompt over its context length; ``generator_refused`` /
``generator_unparseable`` are not).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bsafe_data.llm.cache import request_key
from bsafe_data.llm.client import CHAT_PATH, parse_completion
from bsafe_data.llm.endpoints import GENERATOR_ROLE, generator_endpoint
from bsafe_data.llm.engine import Call, Engine, Reply
from bsafe_data.llm.errors import RequestFailed, failure_detail
from bsafe_data.recipe import GeneratorSpec
from bsafe_data.stages.step import Remote


@dataclass(frozen=True)
class TextPrompt:
    """What a writer asks for: the system message, and the protocol that is part of every cache key
    (bump it when the prompt or the parsing change)."""

    protocol: str
    system: str


@dataclass(frozen=True)
class Written:
    """One answer: the text, or a reason code (``transient`` failures are retried by a re-run)."""

    text: str = ""
    error: str | None = None
    detail: str = ""
    transient: bool = False


def render_conversation(context: Sequence[tuple[str, str]]) -> str:
    """The conversation turns as a ``<conversation>`` block for a user message."""
    turns = "\n".join(f"[{role}]\n{content}\n" for role, content in context)
    return f"<conversation>\n{turns}</conversation>"


class TextWriter:
    """Asks the generator's endpoint for plain-text answers (``awrite``: one, as a coroutine)."""

    def __init__(self, spec: GeneratorSpec, prompt: TextPrompt, engine: Engine):
        self.spec = spec
        self.prompt = prompt
        self.engine = engine
        self._endpoint = generator_endpoint(engine, spec)
        self.usage = {"requests": 0, "cache_hits": 0, "errors": 0}

    def payload(self, user: str, seed: int) -> dict[str, Any]:
        """The chat request for one user message (the recipe's seed wins over the row's)."""
        spec = self.spec
        return {
            "model": spec.model,
            "messages": [
                {"role": "system", "content": self.prompt.system},
                {"role": "user", "content": user},
            ],
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "max_tokens": spec.max_tokens,
            "seed": spec.seed if spec.seed is not None else seed,
        }

    def task(self, user: str, seed: int) -> Remote:
        """One answer as the flow's task."""
        return Remote(self.awrite(user, seed), GENERATOR_ROLE)

    def write(self, jobs: Sequence[tuple[str, int]]) -> list[Written]:
        """One ``Written`` per (user message, seed), in order (waits for all)."""
        return self.engine.gather([self.awrite(user, seed) for user, seed in jobs])

    async def awrite(self, user: str, seed: int) -> Written:
        """The answer to one user message; cached answers send no request."""
        body = json.dumps(self.payload(user, seed), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        data = body.encode()
        call = Call(
            CHAT_PATH, data, request_key(data, self.prompt.protocol), self.spec.model, parse_completion
        )
        try:
            async with self._endpoint.check.answer() as judge:
                reply = await self._endpoint.ask(call)
                unusable = _unusable(reply)
                judge(unusable[0] if unusable else None, reply.text)
        except RequestFailed as exc:
            self.usage["errors"] += 1
            self.usage["requests"] += exc.attempts
            detail = f"generator: {failure_detail(exc)}"
            return Written(error="generator_error", detail=detail, transient=exc.transient)
        if reply.cached:
            self.usage["cache_hits"] += 1
        self.usage["requests"] += reply.attempts
        if unusable is not None:
            return Written(error=unusable[1], detail=f"generator: {unusable[2]}")
        return Written(text=reply.text.strip())


def _unusable(reply: Reply) -> tuple[str, str, str] | None:
    """Why an answer cannot be used: (the answer check's reason, the row's reason code, detail)."""
    if reply.finish_reason == "content_filter":
        return "refused", "generator_refused", "finish_reason=content_filter"
    if reply.finish_reason == "length":
        return "truncated", "generator_unparseable", "finish_reason=length"
    if not reply.text.strip():
        return "unparseable", "generator_unparseable", "empty answer"
    return None
