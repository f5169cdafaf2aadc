"""Generator backend for OpenAI-compatible chat endpoints (OpenAI, vLLM, llama.cpp, TGI, ...).

Each request is rendered from the prompt template and asked of the generator's endpoint on the
build's engine (``bsafe_data.llm.engine``: response cache, single flight, transport). Answers are
parsed with ``bsafe_data.inject.parse_output``. A refused, unparseable or truncated answer is
re-asked with the next seed (``seed + attempt``) and a reminder in the prompt, up to
``refusal_retries`` times; after that the row gets ``generator_refused`` (last answer a refusal) or
``generator_unparseable`` (last answer unparseable or truncated). A request whose transport retries
run out gets ``generator_error``. ``FatalEndpointError`` (bad key, wrong URL) propagates and stops
the run.

Every generation (its last answer) is judged by the endpoint's answer check (``llm/breaker.py``: the
first ones decide whether the build goes on). ``agenerate`` is the coroutine of one request (the
executor submits it and goes on); ``generate_batch`` runs many and waits. The endpoint is checked
with ``GET /models`` before the first request.

The ``usage`` property is cumulative over the generator's lifetime: ``requests`` (HTTP requests
it sent, retries included; companion writers on the same endpoint count their own), ``cache_hits``,
``retries`` (transport retries), ``content_retries`` (re-asks after refusals/unparseable answers),
``input_tokens``, ``output_tokens`` (as reported by the server, cache hits excluded), ``cost_usd``
(from ``prices``: USD per 1M ``input``/``output`` tokens), row outcomes ``refused``,
``unparseable``, ``errors``, and the endpoint's concurrency (``AdaptiveLimit.usage``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.inject import (
    TEMPLATE_VERSION,
    ParsedOutput,
    load_template,
    parse_output,
    template_variables,
)
from bsafe_data.llm.cache import request_key
from bsafe_data.llm.client import CHAT_PATH, check_endpoint, parse_completion
from bsafe_data.llm.endpoints import GENERATOR_ROLE, generator_endpoint
from bsafe_data.llm.engine import Call, Engine, Reply
from bsafe_data.llm.errors import RequestFailed, failure_detail
from bsafe_data.recipe import GeneratorSpec
from bsafe_data.stages.step import Remote, Task

_CACHE_STATUS = {"ok": "ok", "unparseable": "ok", "refused": "refused", "truncated": "truncated"}
_ERROR_CODE = {
    "refused": "generator_refused",
    "unparseable": "generator_unparseable",
    "truncated": "generator_unparseable",
}
_SEED_MOD = 1 << 63
_USER_MARK = "\x00user\x00"
_SEED_MARK = "\x00seed\x00"


class OpenAIGenerator(Generator):
    """``Generator`` (backend ``"openai"``) for any OpenAI-compatible ``/chat/completions`` endpoint."""

    backend = "openai"
    remote = True

    def __init__(
        self,
        spec: GeneratorSpec,
        engine: Engine | None = None,
        *,
        cache_dir: Path | None = None,
        backoff_base_s: float = 0.5,
        check: bool = True,
    ):
        """Set up the prompt and the endpoint on ``engine`` (a build's; without one the generator
        runs its own over ``cache_dir``, closed by ``close``); no network traffic until the first
        request. ``check=False`` skips the ``GET /models`` check made before the first request.
        """
        self.spec = spec
        self.model = spec.model
        self.template = spec.template
        self._prompt = load_template(spec.template)
        self._own_engine = engine is None
        self.engine = engine if engine is not None else Engine(cache_dir)
        self._endpoint = generator_endpoint(self.engine, spec, backoff_base_s=backoff_base_s)
        self.endpoint = self._endpoint.transport.public
        self._checked = not check
        self._check_lock: asyncio.Lock | None = None
        prices = spec.prices or {}
        self._price_in = float(prices.get("input", 0.0)) / 1e6
        self._price_out = float(prices.get("output", 0.0)) / 1e6
        self._counts = dict.fromkeys(
            ("requests", "cache_hits", "retries", "content_retries", "input_tokens", "output_tokens",
             "refused", "unparseable", "errors"), 0
        )  # fmt: skip
        self._skeletons: dict[str, tuple[str, str, str]] = {}
        self._sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "max_tokens": spec.max_tokens}
        self._tracks_tokens = self._endpoint.transport.limiter.tracks_tokens

    # -- public API ----------------------------------------------------------------------------
    @property
    def usage(self) -> dict[str, Any]:
        """Cumulative usage counters (see the module docstring)."""
        counts = self._counts
        cost = counts["input_tokens"] * self._price_in + counts["output_tokens"] * self._price_out
        keys = ("requests", "cache_hits", "retries", "content_retries", "input_tokens", "output_tokens")
        return {
            **{k: counts[k] for k in keys},
            "cost_usd": round(cost, 6),
            "refused": counts["refused"],
            "unparseable": counts["unparseable"],
            "errors": counts["errors"],
            **self._endpoint.transport.concurrency.usage(),
        }

    def check(self) -> list[str] | None:
        """Check the endpoint and key with ``GET /models`` (done once before the first request).

        Raises ``FatalEndpointError`` if the key is rejected or the endpoint unreachable.
        """
        return self.engine.run(self._check())

    async def _check(self) -> list[str] | None:
        transport = self._endpoint.transport
        served = await check_endpoint(transport.base_url, transport.api_key, self.model, self.spec.timeout_s)
        self._checked = True
        return served

    def task(self, request: GenerationRequest) -> Task:
        """The request as a coroutine for the engine."""
        return Remote(self.agenerate(request), GENERATOR_ROLE)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One ``Generation`` per request, in order. Raises ``FatalEndpointError`` to stop the run."""
        return self.engine.gather([self.agenerate(r) for r in requests])

    async def agenerate(self, request: GenerationRequest) -> Generation:
        """The generation of one request: asked (and re-asked after a refusal or an unusable answer)
        on the engine; failures are a ``Generation`` with a reason code."""
        if not self._checked:
            if self._check_lock is None:
                self._check_lock = asyncio.Lock()
            async with self._check_lock:
                if not self._checked:
                    await self._check()
        async with self._endpoint.check.answer() as judge:  # the first answers decide (llm/breaker)
            generation, status, text = await self._attempts(request)
            if generation.error != "generator_error":  # a failed request is no answer
                judge(None if status == "ok" else status, text)
        return generation

    async def _attempts(self, request: GenerationRequest) -> tuple[Generation, str, str]:
        """The generation of one request, the parse status and the text of its last answer."""
        counts = self._counts
        usage = {"requests": 0, "cache_hits": 0, "retries": 0, "input_tokens": 0, "output_tokens": 0}
        parsed: ParsedOutput | None = None
        max_attempts = self.spec.refusal_retries + 1
        for attempt in range(max_attempts):
            if attempt:
                counts["content_retries"] += 1
            try:
                reply = await self._endpoint.ask(self._call(request, attempt))
            except RequestFailed as exc:
                usage["requests"] += exc.attempts
                usage["retries"] += exc.attempts - 1
                counts["requests"] += exc.attempts
                counts["retries"] += exc.attempts - 1
                counts["errors"] += 1
                failed = Generation(
                    category=request.category,
                    error="generator_error",
                    detail=failure_detail(exc),
                    usage=usage,
                    transient=exc.transient,
                )
                return failed, "error", ""
            if reply.cached:
                usage["cache_hits"] += 1
                counts["cache_hits"] += 1
            else:
                for into in (usage, counts):
                    into["requests"] += reply.attempts
                    into["retries"] += max(0, reply.attempts - 1)
                    into["input_tokens"] += reply.input_tokens
                    into["output_tokens"] += reply.output_tokens
            parsed = parse_output(reply.text, request.part1, request.category, reply.finish_reason)
            if parsed.status == "ok":
                generation = Generation(
                    steering=parsed.steering,
                    violation=parsed.violation,
                    category=parsed.category,
                    detail=parsed.detail,
                    usage=usage,
                )
                return generation, "ok", reply.text
        assert parsed is not None
        counts["refused" if parsed.status == "refused" else "unparseable"] += 1
        detail = f"{parsed.detail} (after {max_attempts} attempt(s))"
        unusable = Generation(
            category=request.category, error=_ERROR_CODE[parsed.status], detail=detail, usage=usage
        )
        return unusable, parsed.status, reply.text

    def close(self) -> None:
        """Close the engine this generator runs itself (a build's engine is closed by the build)."""
        if self._own_engine:
            self.engine.close()

    # -- internals -----------------------------------------------------------------------------
    def _call(self, request: GenerationRequest, attempt: int) -> Call:
        body, key = self._body(request, attempt)
        est = len(body) // 4 + self.spec.max_tokens if self._tracks_tokens else 0

        def status(reply: Reply) -> str:
            parsed = parse_output(reply.text, request.part1, request.category, reply.finish_reason)
            return _CACHE_STATUS[parsed.status]

        return Call(CHAT_PATH, body, key, self.model, parse_completion, status, est)

    def _payload(self, system: str, user: Any, seed: Any) -> dict[str, Any]:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        return {"model": self.model, "messages": messages, "seed": seed, **self._sampling}

    def _skeleton(self, system: str) -> tuple[str, str, str]:
        """Canonical body split around the user text and the seed: splicing skips re-serialising
        the (long, constant) system prompt for every row. Gives the same bytes as ``json.dumps``."""
        found = self._skeletons.get(system)
        if found is None:
            text = json.dumps(
                self._payload(system, _USER_MARK, _SEED_MARK), sort_keys=True, separators=(",", ":")
            )
            head, rest = text.split(json.dumps(_USER_MARK), 1)
            middle, tail = rest.split(json.dumps(_SEED_MARK), 1)  # "messages" sorts before "seed"
            found = self._skeletons[system] = (head, middle, tail)
        return found

    def _body(self, request: GenerationRequest, attempt: int) -> tuple[bytes, str]:
        """Canonical JSON request body (sorted keys, compact) and its cache key."""
        base = self.spec.seed if self.spec.seed is not None else request.seed
        seed = (base + attempt) % _SEED_MOD
        variables = template_variables(request.context, request.part1, request.category, attempt)
        system = self._prompt.render_system(variables)
        user = self._prompt.render_user(variables)
        if self._prompt.static_system:
            head, middle, tail = self._skeleton(system)
            text = f"{head}{json.dumps(user)}{middle}{seed}{tail}"
        else:
            text = json.dumps(self._payload(system, user, seed), sort_keys=True, separators=(",", ":"))
        body = text.encode()
        return body, request_key(body, TEMPLATE_VERSION)
