"""Shared plumbing of the HTTP classifiers: requests on the engine, stored answers, logprobs.

Every classifier call is asked on the build's engine (``bsafe_data.llm.engine``), at the
classifier's own endpoint (its concurrency, timeout and retries): the response cache key is the
sha256 of the canonical JSON request body (model, messages or input, sampling parameters) plus the
classifier protocol version, never the API key or the endpoint URL. The stored text is the part of
the answer the parser needs (JSON), so changing a parser or a threshold costs no request. The
package's one retry policy applies (``bsafe_data.llm.retry``): 408/409/425/429/5xx, connection
errors and malformed answers are retried with backoff; 400/401/403/404 and an exhausted quota stop
the run with ``FatalEndpointError`` naming the classifier; a request that still fails gives that
text a score labelled ``error`` (rules reject the row with ``classifier_error``). Texts are never
logged.

``ascore(item)`` is one verdict as a coroutine (the flow's ``task``); ``score_items`` asks for many
and waits. A classifier made without an engine (a reward critic, a script) runs its own.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsafe_data.classify.base import ERROR_LABEL, Classifier, Item, Score, is_unsafe
from bsafe_data.llm.cache import request_key
from bsafe_data.llm.endpoints import classifier_endpoint
from bsafe_data.llm.engine import Batched, Call, Engine, Reply
from bsafe_data.llm.errors import RequestFailed, failure_detail
from bsafe_data.stages.step import Remote, Task

#: Logprob positions kept in the cache (the decision token is near the start of a guard's answer).
_LOGPROB_POSITIONS = 48


def canonical(payload: dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, compact): the bytes sent and hashed."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Request:
    """One HTTP request: path under the base URL and its JSON payload."""

    path: str  # "/chat/completions", "/completions", "/moderations"
    payload: dict[str, Any]


def logprob_positions(choice: dict[str, Any]) -> list[list[Any]]:
    """[[token, {alternative: logprob}], ...] from a chat or a completions choice; [] if none."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return []
    out: list[list[Any]] = []
    content = lp.get("content")
    if isinstance(content, list):  # chat format
        for pos in content[:_LOGPROB_POSITIONS]:
            alts = {a["token"]: float(a["logprob"]) for a in pos.get("top_logprobs") or [] if "token" in a}
            alts.setdefault(pos.get("token", ""), float(pos.get("logprob", 0.0)))
            out.append([pos.get("token", ""), alts])
        return out
    tokens = lp.get("tokens")
    if isinstance(tokens, list):  # completions format
        tops = lp.get("top_logprobs") or []
        chosen = lp.get("token_logprobs") or []
        for i, token in enumerate(tokens[:_LOGPROB_POSITIONS]):
            alts = {k: float(v) for k, v in (tops[i] if i < len(tops) and tops[i] else {}).items()}
            if i < len(chosen) and chosen[i] is not None:
                alts.setdefault(token, float(chosen[i]))
            out.append([token, alts])
    return out


def probability(
    positions: Sequence[Sequence[Any]],
    unsafe: Sequence[str],
    safe: Sequence[str],
    anchor: str | None = None,
) -> float | None:
    """P(unsafe) at the first answer position (after ``anchor``): unsafe mass / (unsafe + safe mass)."""
    unsafe_keys = {t.strip().lower() for t in unsafe}
    safe_keys = {t.strip().lower() for t in safe}
    start = 0
    if anchor:
        text = ""
        start = len(positions)
        for i, (token, _) in enumerate(positions):
            text += token
            if anchor.lower() in text.lower():
                start = i + 1
                break
    for token, alts in positions[start:]:
        if token.strip().lower() not in unsafe_keys | safe_keys:
            if token.strip():
                break  # the first real token is not an answer token: no probability
            continue
        p_unsafe = sum(math.exp(lp) for t, lp in alts.items() if t.strip().lower() in unsafe_keys)
        p_safe = sum(math.exp(lp) for t, lp in alts.items() if t.strip().lower() in safe_keys)
        if p_unsafe + p_safe <= 0:
            return None
        return p_unsafe / (p_unsafe + p_safe)
    return None


def stored_choice(body: dict[str, Any]) -> dict[str, Any]:
    """What the cache keeps of a chat/completions answer: text, finish reason, logprob positions."""
    choice = body["choices"][0]
    if "message" in choice:
        text = (choice.get("message") or {}).get("content") or ""
    else:
        text = choice.get("text") or ""
    if not isinstance(text, str):
        raise ValueError("content is not a string")
    return {"text": text, "finish_reason": choice.get("finish_reason"), "logprobs": logprob_positions(choice)}


def find_span(stream: str, span: str) -> int | None:
    """Start of ``span`` in ``stream`` (last occurrence; whitespace and case tolerant), or None."""
    span = span.strip()
    if not span:
        return None
    pos = stream.rfind(span)
    if pos >= 0:
        return pos
    words = span.split()
    pattern = re.compile(r"\s+".join(re.escape(w) for w in words), re.IGNORECASE)
    found = None
    for match in pattern.finditer(stream):
        found = match.start()
    return found


class RemoteClassifier(Classifier):
    """Base of the HTTP classifiers: subclasses build requests and parse stored answers."""

    provider = "remote"
    protocol = "classify/remote/1"  # part of every cache key: bump when requests or storage change
    remote = True

    def __init__(
        self,
        spec: Any,
        cache_dir: Path | str | None = None,
        *,
        engine: Engine | None = None,
        backoff_base_s: float = 0.5,
    ):
        super().__init__()
        self.spec = spec
        self.name: str = spec.name
        self.threshold: float = spec.threshold
        self.targets: tuple[str, ...] = tuple(spec.scored_targets)
        self.model: str = spec.model
        self._own_engine = engine is None
        self.engine = engine if engine is not None else Engine(Path(cache_dir) if cache_dir else None)
        self._endpoint = classifier_endpoint(self.engine, spec, backoff_base_s=backoff_base_s)
        self.base_url, self.endpoint = self._endpoint.transport.base_url, self._endpoint.transport.public
        self.usage = {"requests": 0, "cache_hits": 0, "retries": 0, "errors": 0}

    # -- to implement --------------------------------------------------------------------------
    def request(self, item: Item) -> Request:
        """The request that scores ``item``."""
        raise NotImplementedError

    def parse(self, item: Item, stored: dict[str, Any]) -> Score:
        """A Score from what the cache holds for ``item``'s request."""
        raise NotImplementedError

    def extract(self, body: dict[str, Any]) -> dict[str, Any]:
        """What to store of a response body (default: a chat/completions choice)."""
        return stored_choice(body)

    def batched(self, request: Request) -> Batched | None:
        """How requests share one HTTP request (default: they do not)."""
        return None

    # -- scoring -------------------------------------------------------------------------------
    def call(self, item: Item) -> Call:
        """The engine call that scores ``item``."""
        request = self.request(item)
        body = canonical(request.payload)

        def extract(raw: bytes) -> Reply:
            return Reply(json.dumps(self.extract(json.loads(raw))))

        key = request_key(body, self.protocol)
        return Call(
            request.path, body, key, self.model, extract, batched=self.batched(request), readable=_is_json
        )

    def task(self, item: Item) -> Task:
        """The verdict on ``item`` as a coroutine for the engine."""
        return Remote(self.ascore(item), self._endpoint.role)

    async def ascore(self, item: Item) -> Score:
        """The verdict on one item; a failed request is an ``error`` score, never an exception
        (``FatalEndpointError`` excepted)."""
        usage = self.usage
        try:
            reply = await self._endpoint.ask(self.call(item))
        except RequestFailed as exc:
            usage["errors"] += 1
            self._count_requests()
            detail = {"error": failure_detail(exc), "transient": exc.transient}
            return Score(self.name, ERROR_LABEL, 0.0, detail=detail)
        if reply.cached:
            usage["cache_hits"] += 1
        self._count_requests()
        try:
            return self.parse(item, json.loads(reply.text))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return Score(self.name, ERROR_LABEL, 0.0, detail={"error": f"unparseable: {exc}"})

    def _count_requests(self) -> None:
        transport = self._endpoint.transport
        self.usage["requests"], self.usage["retries"] = transport.stats.requests, transport.stats.retries
        self.usage.update(transport.concurrency.usage())

    def score_items(self, items: Sequence[Item]) -> list[Score]:
        """One Score per item, waiting for all (identical items send one request: the engine's)."""
        return self.engine.gather([self.ascore(item) for item in items])

    def label(self, score: float) -> str:
        """unsafe at or above the threshold."""
        return "unsafe" if is_unsafe(score, self.threshold) else "safe"

    def close(self) -> None:
        """Close the engine this classifier runs itself (a build's engine is closed by the build)."""
        if self._own_engine:
            self.engine.close()


def _is_json(reply: Reply) -> bool:
    """A stored classifier answer is JSON (anything else is a damaged entry: asked again)."""
    try:
        json.loads(reply.text)
    except ValueError:
        return False
    return True


def conversation(item: Item, assistant: str) -> list[dict[str, str]]:
    """User/assistant turns for a guard: the context (system turns dropped) then ``assistant``.

    Guards expect the conversation to start with a user turn and to alternate; consecutive turns of
    one role are joined, and an empty user turn is added when the context has none.
    """
    turns: list[dict[str, str]] = []
    for role, content in item.context:
        if role not in ("user", "assistant"):
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": ""})
    if turns[-1]["role"] == "assistant":
        turns.append({"role": "user", "content": ""})
    turns.append({"role": "assistant", "content": assistant})
    return turns


def last_user(item: Item) -> str:
    """The last user turn of the context ('' if none)."""
    for role, content in reversed(item.context):
        if role == "user":
            return content
    return ""
