"""Plain-text completions from the generator endpoint: a prompt template, the transport, the cache.

Methods that need free text rather than the injection protocol (BSAFE's safe continuations, DeRTa's
refusals, Reset's safe answers) describe it with a ``TextPrompt`` (a system message and the cache
protocol) and ask a ``TextWriter`` for one answer per (user message, seed). Requests go through the
package's one transport (retries, backoff, fatal errors) and response cache, keyed like every other
request (``request_key(body, protocol)``); failures are never cached, so a re-run asks again for
exactly those rows. Each answer is a ``Written``: the text, or a reason code
(``generator_error`` is transient unless the endpoint refused that very request, e.g. a prompt over
its context length; ``generator_refused`` / ``generator_unparseable`` are not).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsafe_data.llm.cache import ResponseCache, request_key
from bsafe_data.llm.errors import RequestFailed, failure_detail
from bsafe_data.llm.loop import off_running_loop
from bsafe_data.llm.shared import generator_role
from bsafe_data.llm.transport import Transport, resolve_endpoint
from bsafe_data.recipe import GeneratorSpec


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
    """Asks an OpenAI-compatible endpoint for plain-text answers; answers go to the response cache."""

    def __init__(self, spec: GeneratorSpec, prompt: TextPrompt, cache_dir: Path | None = None):
        self.spec = spec
        self.prompt = prompt
        endpoint = resolve_endpoint(spec.base_url, spec.api_key_env)
        self._transport = Transport(
            endpoint.base_url,
            endpoint.api_key,
            role=generator_role(),
            max_concurrency=spec.max_concurrency,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
            requests_per_minute=spec.requests_per_minute,
            tokens_per_minute=spec.tokens_per_minute,
            backoff_max_s=30.0,
        )
        self._cache = ResponseCache(cache_dir)
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

    def write(self, jobs: Sequence[tuple[str, int]]) -> list[Written]:
        """One ``Written`` per (user message, seed), in order; cached answers send no request."""
        bodies = [
            json.dumps(self.payload(*job), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            for job in jobs
        ]
        keys = [request_key(b, self.prompt.protocol) for b in bodies]
        found = {k: (hit.text, hit.finish_reason) for k, hit in self._cache.get_many(keys).items()}
        self.usage["cache_hits"] += sum(1 for k in keys if k in found)
        todo = {k: b for k, b in zip(keys, bodies, strict=True) if k not in found}
        failed: dict[str, RequestFailed] = {}
        if todo:
            fetched = off_running_loop(asyncio.run, self._fetch(todo))
            self.usage["requests"] = self._transport.stats.requests
            for key, result in fetched.items():
                if isinstance(result, RequestFailed):
                    failed[key] = result
                    self.usage["errors"] += 1
                else:
                    found[key] = result
                    self._cache.put(key, model=self.spec.model, status="ok", text=result[0],
                                    finish_reason=result[1])  # fmt: skip
            self._cache.flush()
        return [self._parse(found.get(k), failed.get(k)) for k in keys]

    @staticmethod
    def _parse(answer: tuple[str, str | None] | None, failure: RequestFailed | None) -> Written:
        if answer is None:
            reason = failure_detail(failure) if failure is not None else "not run"
            transient = failure is None or failure.transient
            return Written(error="generator_error", detail=f"generator: {reason}", transient=transient)
        text, finish = answer
        if finish == "content_filter":
            return Written(error="generator_refused", detail="generator: finish_reason=content_filter")
        if finish == "length":
            return Written(error="generator_unparseable", detail="generator: finish_reason=length")
        if not text.strip():
            return Written(error="generator_unparseable", detail="generator: empty answer")
        return Written(text=text.strip())

    async def _fetch(self, todo: dict[str, bytes]) -> dict[str, tuple[str, str | None] | RequestFailed]:
        out: dict[str, tuple[str, str | None] | RequestFailed] = {}

        def extract(raw: bytes) -> tuple[str, str | None]:
            choice = json.loads(raw)["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
            if not isinstance(text, str):
                raise ValueError("content is not a string")
            return text, choice.get("finish_reason")

        async def one(entry: tuple[str, bytes]) -> None:
            key, body = entry
            try:
                out[key] = await self._transport.post("/chat/completions", body, extract)
            except RequestFailed as exc:
                out[key] = exc

        async with self._transport as transport:
            await transport.run(list(todo.items()), one, len(todo))
        return out

    def close(self) -> None:
        """Commit and close the cache."""
        self._cache.close()
