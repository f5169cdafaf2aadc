"""Shared plumbing of the HTTP classifiers: request keys, the response cache, logprobs.

Every classifier call goes through the engine's SQLite response cache (``bsafe_data.llm.cache``):
the key is the sha256 of the canonical JSON request body (model, messages or input, sampling
parameters) plus the classifier protocol version, never the API key or the endpoint URL. The stored
text is the part of the answer the parser needs (JSON), so changing a parser or a threshold costs no
request. Requests go through the generator's transport (``bsafe_data.llm.transport``, one instance
per classifier with the spec's concurrency, timeout and retries) and so follow the package's one
retry policy (``bsafe_data.llm.retry``): 408/409/425/429/5xx, connection errors and malformed
answers are retried with backoff; 400/401/403/404 and an exhausted quota stop the run with
``FatalEndpointError`` naming the classifier; a request that still fails gives that text a score
labelled ``error`` (rules reject the row with ``classifier_error``). Texts are never logged.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bsafe_data.classify.base import ERROR_LABEL, Classifier, Item, Score, is_unsafe
from bsafe_data.llm.cache import ResponseCache, request_key
from bsafe_data.llm.errors import RequestFailed, failure_detail
from bsafe_data.llm.loop import off_running_loop
from bsafe_data.llm.shared import classifier_role
from bsafe_data.llm.transport import Transport, resolve_endpoint

T = TypeVar("T")
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

    def __init__(self, spec: Any, cache_dir: Path | str | None = None, *, backoff_base_s: float = 0.5):
        super().__init__()
        self.spec = spec
        self.name: str = spec.name
        self.threshold: float = spec.threshold
        self.targets: tuple[str, ...] = tuple(spec.scored_targets)
        self.model: str = spec.model
        endpoint = resolve_endpoint(spec.base_url, spec.api_key_env)
        self.base_url, self.endpoint = endpoint.base_url, endpoint.public
        self._transport = Transport(
            endpoint.base_url,
            endpoint.api_key,
            role=classifier_role(spec.name),
            max_concurrency=spec.max_concurrency,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
            backoff_base_s=backoff_base_s,
            backoff_max_s=30.0,
        )
        self._cache = ResponseCache(cache_dir)
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

    # -- scoring -------------------------------------------------------------------------------
    def score_items(self, items: Sequence[Item]) -> list[Score]:
        """One Score per item; identical requests are sent once; cached answers are not re-sent."""
        if not items:
            return []
        requests = [self.request(i) for i in items]
        bodies = [canonical(r.payload) for r in requests]
        keys = [request_key(b, self.protocol) for b in bodies]
        hits = self._cache.get_many(keys)
        stored: dict[str, dict[str, Any]] = {}
        for key, hit in hits.items():
            stored[key] = json.loads(hit.text)
        self.usage["cache_hits"] += sum(1 for k in keys if k in hits)
        todo: dict[str, tuple[Request, bytes]] = {}
        for key, req, body in zip(keys, requests, bodies, strict=True):
            if key not in stored and key not in todo:
                todo[key] = (req, body)
        failed: dict[str, RequestFailed] = {}
        if todo:
            fetched = off_running_loop(asyncio.run, self._fetch_all(todo))
            self.usage["requests"] = self._transport.stats.requests
            self.usage["retries"] = self._transport.stats.retries
            for key, result in fetched.items():
                if isinstance(result, RequestFailed):
                    failed[key] = result
                    self.usage["errors"] += 1
                    self._cache.put(key, model=self.model, status="error", text="", detail=result.reason)
                else:
                    stored[key] = result
                    self._cache.put(key, model=self.model, status="ok", text=json.dumps(result))
            self._cache.flush()
        scores = []
        for item, key in zip(items, keys, strict=True):
            if key in failed:
                detail = {"error": failure_detail(failed[key]), "transient": failed[key].transient}
                scores.append(Score(self.name, ERROR_LABEL, 0.0, detail=detail))
                continue
            try:
                scores.append(self.parse(item, stored[key]))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                scores.append(Score(self.name, ERROR_LABEL, 0.0, detail={"error": f"unparseable: {exc}"}))
        return scores

    def label(self, score: float) -> str:
        """unsafe at or above the threshold."""
        return "unsafe" if is_unsafe(score, self.threshold) else "safe"

    def close(self) -> None:
        """Commit and close the cache."""
        self._cache.close()

    # -- HTTP ----------------------------------------------------------------------------------
    async def _fetch_all(
        self, todo: dict[str, tuple[Request, bytes]]
    ) -> dict[str, dict[str, Any] | RequestFailed]:
        """The stored form of every answer (or why it failed), by cache key."""
        out: dict[str, dict[str, Any] | RequestFailed] = {}

        async def one(entry: tuple[str, tuple[Request, bytes]]) -> None:
            key, (req, body) = entry
            try:
                out[key] = await self._post(req.path, body, self.extract)
            except RequestFailed as exc:
                out[key] = exc

        await self._each(list(todo.items()), one)
        return out

    async def _each(self, items: list[T], handler: Callable[[T], Awaitable[None]]) -> None:
        """Run ``handler`` on every item, ``max_concurrency`` at a time, in one HTTP session."""
        async with self._transport as transport:
            await transport.run(items, handler, len(items))

    async def _post(self, path: str, body: bytes, extract: Callable[[Any], T]) -> T:
        """POST through the transport; ``extract`` of the JSON body of a 200 (a malformed body is
        retried like a transport error)."""
        return await self._transport.post(path, body, lambda raw: extract(json.loads(raw)))


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
