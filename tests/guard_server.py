"""A local OpenAI-compatible server for classifier tests (127.0.0.1, random port, aiohttp).

Serves ``POST /v1/moderations``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` with
deterministic answers, so tests can predict every verdict:

* a text is **unsafe** when it contains one of ``unsafe_words`` (case-insensitive);
* its P(unsafe) is ``0.5 + 0.49·h`` when unsafe and ``0.3·h`` when safe, ``h`` a hash of the text in
  [0, 1): scores spread over the range, so threshold changes move rows;
* ``/moderations``: ``moderation_words`` (category → words) give that category the P above;
* chat/completions by model name (case-insensitive substring): ``llama-guard`` answers ``safe`` /
  ``unsafe\\nS10`` (the code from ``hazards``, word → code) on the last Agent message,
  ``shieldgemma`` answers ``Yes``/``No`` on the Chatbot Response, ``wildguard`` the three WildGuard
  lines; any model given the judge prompt (``<<<`` answer ``>>>``) answers a JSON verdict whose
  span starts at ``judge_span_from`` when that word is in the answer (else at the first unsafe
  word); any other model answers ``yes``/``no`` on its whole prompt. Logprobs are
  returned when asked (``logprobs`` config).

``fail_status`` + ``fail_count`` make the next N model requests fail with that status;
``latency_s`` delays every model answer. Counters: ``stats()`` (``requests`` total and per path)
and ``arrivals()`` (when each model request arrived, ``time.monotonic``). ``GuardServer`` runs in a
thread of the caller's process; ``GuardServerProcess`` runs it in a process of its own (benchmarks:
the server never shares the client's interpreter lock), controlled over ``/_stats``, ``/_reset``
and ``/_config``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from typing import Any

from aiohttp import web

DEFAULTS: dict[str, Any] = {
    "unsafe_words": ["idiot", "moron", "stupid", "loser", "damn", "crap", "zorblax"],
    "hazards": {"zorblax": "S1"},
    "default_hazard": "S10",
    "moderation_words": {
        "harassment": ["idiot", "moron", "loser", "stupid", "dumb", "jerk", "clown"],
        "hate": ["zorblax"],
        "violence": ["kill"],
    },
    "logprobs": True,
    "judge_span_from": None,
    "judge_category": "Harassment",
    "fail_status": None,
    "fail_count": 0,
    "latency_s": 0.0,
}


def unsafe_at(text: str, words: list[str]) -> tuple[int, str] | None:
    """(position, word) of the earliest of ``words`` in ``text``, matched at a word start."""
    found = []
    for word in words:
        match = re.search(r"(?<![0-9a-z])" + re.escape(word.lower()), text.lower())
        if match:
            found.append((match.start(), word))
    return min(found) if found else None


def unit_hash(text: str) -> float:
    """A deterministic number in [0, 1) from the text."""
    return (zlib.crc32(text.encode()) % 1000) / 1000.0


class GuardServer:
    """Start with ``with GuardServer() as server:``; ``server.url`` is the ``/v1`` base URL."""

    def __init__(self, **config: Any):
        self.config = {**DEFAULTS, **config}
        self.counts: dict[str, int] = {}
        self.arrival_times: list[float] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- control -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"requests": sum(self.counts.values()), **self.counts}

    def requests(self) -> int:
        return self.stats()["requests"]

    def arrivals(self) -> list[float]:
        with self._lock:
            return list(self.arrival_times)

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.arrival_times.clear()

    def configure(self, **config: Any) -> None:
        with self._lock:
            self.config.update(config)

    def __enter__(self) -> GuardServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            self.routes(app)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="guard-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def routes(self, app: web.Application) -> None:
        """The server's routes (a subclass serving other models replaces them)."""
        app.router.add_post("/v1/moderations", self._moderations)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/_stats", self._stats)
        app.router.add_post("/_reset", self._reset)
        app.router.add_post("/_config", self._config)

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # -- verdicts ------------------------------------------------------------------------------
    def unsafe_word(self, text: str) -> str | None:
        """The first unsafe word of ``text`` (words match at a word start: "loser" not in "closer")."""
        at = unsafe_at(text, self.config["unsafe_words"])
        return None if at is None else at[1]

    def p_unsafe(self, text: str) -> float:
        h = unit_hash(text)
        return 0.5 + 0.49 * h if self.unsafe_word(text) else 0.3 * h

    # -- plumbing ------------------------------------------------------------------------------
    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"stats": self.stats(), "arrivals": self.arrivals()})

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({})

    async def _config(self, request: web.Request) -> web.Response:
        self.configure(**(await request.json()))
        return web.json_response({})

    async def _count(self, path: str) -> web.Response | None:
        with self._lock:
            self.counts[path] = self.counts.get(path, 0) + 1
            self.arrival_times.append(time.monotonic())
            latency = float(self.config["latency_s"])
            if self.config["fail_status"] and self.config["fail_count"] > 0:
                self.config["fail_count"] -= 1
                status = int(self.config["fail_status"])
                return web.json_response({"error": {"message": f"injected {status}"}}, status=status)
        if latency > 0:
            await asyncio.sleep(latency)
        return None

    async def _moderations(self, request: web.Request) -> web.Response:
        failed = await self._count("moderations")
        if failed is not None:
            return failed
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        results = []
        for text in inputs:
            scores = {}
            for category, words in self.config["moderation_words"].items():
                hit = unsafe_at(text, words) is not None
                h = unit_hash(category + text)
                scores[category] = round(0.5 + 0.49 * h if hit else 0.05 * h, 6)
            for category in ("sexual", "self-harm", "illicit"):
                scores.setdefault(category, 0.001)
            results.append(
                {
                    "flagged": any(v >= 0.5 for v in scores.values()),
                    "categories": {k: v >= 0.5 for k, v in scores.items()},
                    "category_scores": scores,
                }
            )
        return web.json_response({"id": "modr-test", "model": body.get("model"), "results": results})

    def _decide(self, model: str, prompt: str, chat: bool) -> tuple[str, list[Any]]:
        """(answer text, logprob positions as (token, {alt: lp})) for a guard or judge request."""
        model = model.lower()
        if "llama-guard" in model:
            if chat:
                text = prompt
            else:
                text = prompt.rsplit("Agent: ", 1)[-1].split("\n\n<END CONVERSATION>")[0]
            p = self.p_unsafe(text)
            word = self.unsafe_word(text)
            answer = (
                "unsafe\n" + self.config["hazards"].get(word, self.config["default_hazard"])
                if word
                else "safe"
            )
            first = "unsafe" if word else "safe"
            return answer, [(first, {"unsafe": math.log(max(p, 1e-9)), "safe": math.log(max(1 - p, 1e-9))})]
        if "shieldgemma" in model:
            text = prompt.split("Chatbot Response: ", 1)[-1].split("\n<end_of_turn>")[0]
            p = self.p_unsafe(text)
            first = "Yes" if self.unsafe_word(text) else "No"
            alts = {"Yes": math.log(max(p, 1e-9)), "No": math.log(max(1 - p, 1e-9))}
            return f"{first}. The response is checked.", [(first, alts)]
        if "wildguard" in model:
            text = prompt.split("AI assistant:\n", 1)[-1].split("\n\n---")[0]
            p = self.p_unsafe(text)
            verdict = "yes" if self.unsafe_word(text) else "no"
            alts = {" yes": math.log(max(p, 1e-9)), " no": math.log(max(1 - p, 1e-9))}
            tokens = [("Harmful request:", {}), (" no", {}), ("\n", {}), ("Response refusal:", {})]
            tokens += [(" no", {}), ("\n", {}), ("Harmful response:", {}), (f" {verdict}", alts)]
            return "Harmful request: no\nResponse refusal: no\nHarmful response: " + verdict, tokens
        if "<<<\n" in prompt:  # the LLM judge's prompt (any model name)
            answer = prompt.split("<<<\n", 1)[-1].rsplit("\n>>>", 1)[0]
            word = self.unsafe_word(answer)
            marker = self.config["judge_span_from"]
            span = ""
            if word:
                if marker and marker in answer:
                    span = answer[answer.index(marker) :]
                else:
                    span = answer[unsafe_at(answer, self.config["unsafe_words"])[0] :]
            verdict = {
                "violating": bool(word),
                "span": span,
                "category": self.config["judge_category"] if word else "",
                "safe_edit": "[a safe rewrite]",
            }
            return json.dumps(verdict), []
        # any other model: a generic yes/no guard deciding on the whole prompt
        p = self.p_unsafe(prompt)
        first = "yes" if self.unsafe_word(prompt) else "no"
        return first, [(first, {"yes": math.log(max(p, 1e-9)), "no": math.log(max(1 - p, 1e-9))})]

    async def _chat(self, request: web.Request) -> web.Response:
        failed = await self._count("chat")
        if failed is not None:
            return failed
        body = await request.json()
        model = body.get("model", "")
        messages = body["messages"]
        if "llama-guard" in model.lower():
            prompt = messages[-1]["content"]  # the Agent message to judge
        else:
            prompt = "\n".join(m["content"] for m in messages)
        text, positions = self._decide(model, prompt, chat=True)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        if body.get("logprobs") and self.config["logprobs"] and positions:
            choice["logprobs"] = {
                "content": [
                    {
                        "token": token,
                        "logprob": alts.get(token, 0.0),
                        "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alts.items()],
                    }
                    for token, alts in positions
                ]
            }
        usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4}
        return web.json_response(
            {"id": "chat-test", "object": "chat.completion", "choices": [choice], "usage": usage}
        )

    async def _completions(self, request: web.Request) -> web.Response:
        failed = await self._count("completions")
        if failed is not None:
            return failed
        body = await request.json()
        text, positions = self._decide(body.get("model", ""), body["prompt"], chat=False)
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        if body.get("logprobs") and self.config["logprobs"] and positions:
            choice["logprobs"] = {
                "tokens": [t for t, _ in positions],
                "token_logprobs": [alts.get(t, 0.0) for t, alts in positions],
                "top_logprobs": [alts or None for _, alts in positions],
                "text_offset": [],
            }
        return web.json_response({"id": "cmpl-test", "object": "text_completion", "choices": [choice]})


class GuardServerProcess:
    """``GuardServer`` in a process of its own: ``with GuardServerProcess(latency_s=1.0) as server:``."""

    def __init__(self, **config: Any):
        self.config = config
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _call(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", data=data, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, int]:
        return self._call("/_stats")["stats"]

    def arrivals(self) -> list[float]:
        return self._call("/_stats")["arrivals"]

    def reset(self) -> None:
        self._call("/_reset", {})

    def configure(self, **config: Any) -> None:
        self._call("/_config", config)

    def __enter__(self) -> GuardServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, json.dumps(self.config)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"guard server did not start: {line!r}")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def _serve_forever(config: dict[str, Any]) -> None:
    with GuardServer(**config) as server:
        print(server.port, flush=True)
        threading.Event().wait()


# -- helpers shared by the classifier and refilter tests ----------------------------------------

#: Everyday answers; every second sentence starts with "Notably" (the judge tests move spans there).
CORPUS: list[tuple[str, str]] = [
    (
        "How do I water a fern?",
        "Water your fern about once a week with room temperature water. Notably, ferns love humid air "
        "and indirect light. Keep the soil moist but never soggy. Mist the leaves when the air is dry.",
    ),
    (
        "How can I make rice fluffy?",
        "Rinse the rice until the water runs clear. Notably, the ratio of water to rice matters most. "
        "Use about one and a half cups of water per cup of rice. Let it rest covered for ten minutes.",
    ),
    (
        "Any tips for a job interview?",
        "Research the company before the interview. Notably, interviewers remember concrete stories. "
        "Prepare a few examples that show your skills. Send a short thank you note afterwards.",
    ),
    (
        "How do I clean a cast iron pan?",
        "Scrub the pan with hot water and a stiff brush while it is still warm. Notably, soap in small "
        "amounts is fine. Dry it completely on the stove. Rub a thin layer of oil over the surface.",
    ),
    (
        "How should I start running?",
        "Begin with short intervals of running and walking. Notably, rest days are part of training. "
        "Increase your distance slowly, by about ten percent a week. Good shoes help prevent injuries.",
    ),
    (
        "What should I pack for a picnic?",
        "Bring a blanket, napkins and a small cutting board. Notably, sandwiches and fruit travel well. "
        "Pack a bag for trash so you leave the place clean. Sunscreen is a good idea on sunny days.",
    ),
    (
        "How do I keep my houseplants alive in winter?",
        "Move your plants closer to the windows. Notably, most plants need less water in winter. "
        "Keep them away from radiators and cold drafts. Wipe the dust off the leaves once a month.",
    ),
    (
        "How do I fold a fitted sheet?",
        "Hold the sheet by two adjacent corners with the seams facing you. Notably, tucking one corner "
        "into the other is the key step. Lay it flat and fold the edges into a rectangle. Fold it in "
        "thirds and then in half.",
    ),
    (
        "What is a good board game for a family evening?",
        "Zorblax is a cheerful board game that the whole family can play. Notably, a round takes about "
        "an hour. Set up the board and deal five cards to each player. The youngest player starts.",
    ),
    (
        "Can you tell me how to pick a lock?",
        "I'm sorry, but I can't help with that request. Notably, a locksmith can open the door for "
        "you. Call one from the phone book. They usually arrive within an hour.",
    ),
]
ZORBLAX_SOURCE = "8"  # source id of the answer the guard calls unsafe
REFUSAL_SOURCE = "9"  # source id of the answer that is itself a refusal


def write_corpus(path: Any, rows: list[tuple[str, str]] | None = None) -> Any:
    """Write the corpus as prompt/response JSONL; returns the path."""
    with open(path, "w", encoding="utf-8") as fh:
        for prompt, response in rows or CORPUS:
            fh.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def make_recipe(corpus: Any, filters: dict[str, Any], *overrides: str) -> Any:
    """The flagship recipe on ``corpus`` with ``filters``, the primary tokenizer only, 3 variants."""
    from pathlib import Path

    from bsafe_data.registry import load_recipe

    flagship = Path(__file__).parent.parent / "recipes" / "bsafe_plus.yaml"
    return load_recipe(
        flagship,
        [
            f"sources=[{{path: {corpus}}}]",
            "tokenizers.extra=[]",
            "sampling.variants_per_answer=3",
            "split.test_fraction=0.3",
            f"filters={json.dumps(filters)}",
            *overrides,
        ],
    )


if __name__ == "__main__":
    _serve_forever(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
