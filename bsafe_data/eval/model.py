"""The model under test: an OpenAI-compatible endpoint (through the engine and its response cache)
or a local checkpoint run in-process with transformers (the ``[train]`` extra).

Over HTTP, ``api: completions`` renders the conversation with the model's chat template
(``label.chat_frame``) and sends it raw to ``/completions`` with the prefill as the start of the
assistant turn; ``api: chat`` sends messages, a prefill as a final assistant message with
``continue_final_message`` (vLLM's extension). ``extra_body`` (default
``skip_special_tokens: false``) keeps registered control atoms in the returned text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsafe_data.classify.remote import canonical
from bsafe_data.eval.attacks import Instance
from bsafe_data.eval.recipe import ModelSpec
from bsafe_data.label import chat_frame, end_of_turn
from bsafe_data.llm.cache import request_key
from bsafe_data.llm.client import check_endpoint, parse_completion
from bsafe_data.llm.endpoints import endpoint_for
from bsafe_data.llm.engine import Call, Engine, Reply
from bsafe_data.llm.errors import RequestFailed, failure_detail
from bsafe_data.llm.transport import MalformedResponse, loads

#: Part of every cache key of the model under test: bump when requests or storage change.
PROTOCOL = "eval/model/1"
#: The same for generations of a local checkpoint.
LOCAL_PROTOCOL = "eval/local/1"


@dataclass(frozen=True)
class Generation:
    """The model's continuation of one instance."""

    text: str
    ids: tuple[int, ...] | None = None  # the generated token ids when known (in-process)
    finish_reason: str | None = None
    cached: bool = False
    error: str | None = None


def messages_of(instance: Instance) -> list[dict[str, str]]:
    """The instance as messages, a prefill as the final assistant message."""
    messages = [{"role": r, "content": c} for r, c in instance.messages]
    if instance.prefill:
        messages.append({"role": "assistant", "content": instance.prefill})
    return messages


def prompt_text(tokenizer: Any, instance: Instance) -> str:
    """The raw prompt: the chat template up to the answer, then the prefill."""
    head, _tail = chat_frame(tokenizer, [{"role": r, "content": c} for r, c in instance.messages])
    return head + instance.prefill


def parse_text_completion(raw: bytes) -> Reply:
    """Text, finish_reason and usage of a ``/completions`` body; ``MalformedResponse`` if malformed."""
    try:
        data = loads(raw)
        choice = data["choices"][0]
        text = choice["text"]
        usage = data.get("usage") or {}
        reply = Reply(
            text,
            choice.get("finish_reason"),
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise MalformedResponse(f"malformed response ({type(exc).__name__})") from None
    if not isinstance(text, str):
        raise MalformedResponse("malformed response (text is not a string)")
    return reply


class EndpointModel:
    """A model behind an OpenAI-compatible endpoint, asked through the engine (``role`` names its
    endpoint: ``model`` or ``baseline``)."""

    def __init__(self, spec: ModelSpec, engine: Engine, role: str, tokenizer: Any):
        self.spec = spec
        self.engine = engine
        self.tokenizer = tokenizer
        self.role = f"model under test {spec.name!r}" if role == "model" else f"{role} {spec.name!r}"
        self._endpoint = endpoint_for(engine, self.role, spec)
        self._checked = False

    @property
    def requests(self) -> int:
        """HTTP requests sent so far (retries included)."""
        return self._endpoint.transport.stats.requests

    def body(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        """(path, payload) of the request for ``instance``."""
        spec = self.spec
        payload: dict[str, Any] = {
            "model": spec.model,
            "max_tokens": spec.max_tokens,
            "temperature": instance.sampling["temperature"],
            "top_p": instance.sampling["top_p"],
            "seed": spec.seed,
            **spec.extra_body,
        }
        if instance.sampling.get("top_k"):
            payload["top_k"] = instance.sampling["top_k"]
        if spec.api == "completions":
            payload["prompt"] = prompt_text(self.tokenizer, instance)
            return "/completions", payload
        payload["messages"] = messages_of(instance)
        if instance.prefill:
            payload.update(continue_final_message=True, add_generation_prompt=False)
        return "/chat/completions", payload

    def call(self, instance: Instance) -> Call:
        """The engine call of ``instance``."""
        path, payload = self.body(instance)
        body = canonical(payload)
        extract = parse_text_completion if path == "/completions" else parse_completion
        return Call(path, body, request_key(body, PROTOCOL), self.spec.model, extract)

    async def agenerate(self, instance: Instance) -> Generation:
        """The continuation of one instance (a request that failed for good is an ``error``)."""
        try:
            reply = await self._endpoint.ask(self.call(instance))
        except RequestFailed as exc:
            return Generation("", error=failure_detail(exc))
        return Generation(reply.text, None, reply.finish_reason, reply.cached)

    def generate(self, instances: Sequence[Instance]) -> list[Generation]:
        """Every instance's continuation, concurrently (``FatalEndpointError`` stops the run)."""
        if not self._checked and instances:
            transport = self._endpoint.transport
            self.engine.run(
                check_endpoint(transport.base_url, transport.api_key, self.spec.model, 30.0, self.role)
            )
            self._checked = True
        return self.engine.gather([self.agenerate(i) for i in instances])

    def close(self) -> None:
        """Nothing of its own: the engine closes the endpoint."""


class LocalModel:
    """A checkpoint run in-process with transformers (greedy at temperature 0, else sampled with a
    seed per instance). Its answers go into the engine's response cache too, keyed by the
    checkpoint's fingerprint (file names, sizes and modification times), the prompt and the
    sampling: a re-run generates only what is missing."""

    def __init__(self, spec: ModelSpec, engine: Engine, tokenizer: Any):
        self.spec = spec
        self.engine = engine
        self.tokenizer = tokenizer
        self.requests = 0
        self.fingerprint = checkpoint_fingerprint(spec.model)
        self.model: Any = None
        stops = {tokenizer.eos_token_id}
        end = end_of_turn(tokenizer)
        if end:
            stops.add(tokenizer.convert_tokens_to_ids(end))
        self._stops = sorted(s for s in stops if isinstance(s, int) and s >= 0)

    def _load(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        if self.model is None:
            options: dict[str, Any] = {"dtype": torch.float32}
            if self.spec.gguf_file:
                options["gguf_file"] = self.spec.gguf_file
            model = AutoModelForCausalLM.from_pretrained(self.spec.model, **options)
            if len(self.tokenizer) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(self.tokenizer))
            if self.spec.device:
                model.to(self.spec.device)
            self.model = model.eval()
        return self.model

    def key(self, instance: Instance) -> str:
        """The cache key of ``instance``'s generation."""
        payload = {
            "checkpoint": self.fingerprint,
            "prompt": prompt_text(self.tokenizer, instance),
            "sampling": instance.sampling,
            "max_tokens": self.spec.max_tokens,
            "seed": self.spec.seed,
        }
        return request_key(canonical(payload), LOCAL_PROTOCOL)

    def generate(self, instances: Sequence[Instance]) -> list[Generation]:
        """Every instance's continuation: from the cache, else generated one after another."""
        keys = [self.key(i) for i in instances]

        async def lookup() -> list[Reply | None]:
            return [self.engine.lookup(k) for k in keys]

        async def store(key: str, generation: Generation) -> None:
            stored = json.dumps({"text": generation.text, "ids": list(generation.ids or ())})
            self.engine.cache.put(
                key, model=self.spec.model, status="ok", text=stored, finish_reason=generation.finish_reason
            )

        out: list[Generation] = []
        for instance, key, hit in zip(instances, keys, self.engine.run(lookup()), strict=True):
            if hit is not None:
                try:
                    data = json.loads(hit.text)
                    out.append(Generation(data["text"], tuple(data["ids"]), hit.finish_reason, True))
                    continue
                except (ValueError, KeyError, TypeError):
                    pass  # a damaged entry: generated again
            generation = self._generate(instance)
            self.engine.run(store(key, generation))
            out.append(generation)
        return out

    def _generate(self, instance: Instance) -> Generation:
        import torch

        model = self._load()
        text = prompt_text(self.tokenizer, instance)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
        sampling = instance.sampling
        options: dict[str, Any] = {"max_new_tokens": self.spec.max_tokens, "eos_token_id": self._stops}
        if sampling["temperature"] > 0:
            options.update(do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"])
            options["top_k"] = sampling["top_k"] or None
            torch.manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) ^ self.spec.seed)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._stops[0]
        with torch.no_grad():
            result = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **options)
        new = tuple(int(t) for t in result[0, ids.shape[1] :])
        self.requests += 1
        finish = "stop" if new and new[-1] in self._stops else "length"
        return Generation(self.tokenizer.decode(list(new), skip_special_tokens=False), new, finish)

    def close(self) -> None:
        """Drop the weights."""
        self.model = None


def checkpoint_fingerprint(path: str) -> str:
    """A short identity of a local checkpoint: its files' names, sizes and modification times."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    facts = [
        (p.relative_to(root).as_posix() if root.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in files
    ]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def make_model(spec: ModelSpec, engine: Engine, role: str, tokenizer: Any) -> EndpointModel | LocalModel:
    """The model a spec names."""
    if spec.provider == "transformers":
        return LocalModel(spec, engine, tokenizer)
    return EndpointModel(spec, engine, role, tokenizer)
