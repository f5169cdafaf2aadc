"""A small, fast OpenAI-compatible server for tests and benchmarks (127.0.0.1, random port).

Run it in a separate process with ``ServerProcess`` (so it never shares the GIL with the client)::

    with ServerProcess(latency_s=0.05) as server:
        server.url          # "http://127.0.0.1:PORT/v1"
        server.stats()      # {"chat": 12, "models": 1, "statuses": {"200": 11, "429": 1}, ...}
        server.arrivals()   # when each chat request arrived (for rate-limit checks)
        server.reset()      # zero the counters
        server.configure(api_key="sk-test", retry_after="1")

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, and the control endpoints
``GET /_stats``, ``POST /_reset``, ``POST /_config`` (not counted as requests).

Generation answers follow the ``<harmful>…</harmful><category>…</category>`` protocol with bland
placeholder text; the category is read from the ``Target category:`` line of the prompt.

Faults, by marker anywhere in the request body: ``[[fault:KIND]]``, ``[[fault:KIND:N]]`` or
``[[fault:KIND:N:TAG]]`` makes the first N requests carrying that exact marker fail (N=1 by
default, N=0 means always; TAG only makes markers distinct). Or for every chat request, by config:
``fault=KIND`` and ``fault_count=N``. KIND is one of: an HTTP status (``429``, ``500``, ``503``,
``408``, ``400``, ``401``, ``403``, ``404``, ``413``), ``ctxlen`` (400 "maximum context length"),
``quota`` (429 ``insufficient_quota``),
``hang`` (no answer for ``hang_s``), ``drop`` (close the connection), ``malformed`` (cut-off JSON),
``refuse`` (a refusal), ``filter`` (``finish_reason=content_filter``), ``truncate``
(``finish_reason=length``), ``notags`` (an answer without tags).

Config keys: ``latency_s``, ``model``, ``api_key`` (require this bearer key), ``strict_model`` (404
for other models), ``retry_after`` / ``retry_after_ms`` (headers sent with 429), ``hang_s``,
``ratelimit`` (dict of ``x-ratelimit-*`` header suffixes → values sent on 200s), ``notags_text``
(the ``notags`` answer), ``plain_answers`` (requests without a ``Target category:`` line — companion
writers' — get a bland plain-text answer instead of the injection protocol), ``max_in_flight`` (a
chat request arriving while that many are being answered gets an immediate 429, like a provider's
concurrency limit; ``server.samples()`` gives (time, requests in flight, 429s for the limit so far)
every 20 ms while chat requests come in).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from typing import Any

DEFAULTS: dict[str, Any] = {
    "latency_s": 0.0,
    "model": "test-model",
    "api_key": None,
    "strict_model": False,
    "retry_after": "0",
    "retry_after_ms": None,
    "hang_s": 3600.0,
    "ratelimit": None,
    "fault": None,
    "fault_count": 0,
    "plain_answers": False,
    "max_in_flight": None,
    "notags_text": "Here is a continuation without any of the requested tags.",
}

SAMPLE_S = 0.02
_MARKER = re.compile(rb"\[\[fault:([a-z0-9]+)(?::(\d+))?(?::[\w-]+)?\]\]")
_CATEGORY = re.compile(rb"Target category: ([^\\\"<]+)")
_SEED = re.compile(rb'"seed":\s*(\d+)')
_WORDS = (b"cooking", b"gardening", b"tax forms", b"bicycles", b"the weather", b"spreadsheets", b"history")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class App:
    """Request routing, counters and fault injection (one instance per server process)."""

    def __init__(self, config: dict[str, Any]):
        self.config = {**DEFAULTS, **config}
        self.in_flight = 0  # chat requests being answered (not reset: they are)
        self.reset()

    def reset(self) -> None:
        self.chat = 0
        self.arrivals: list[float] = []  # time.monotonic() of every chat request, in order
        self.over = 0  # 429s for max_in_flight
        self.samples: list[tuple[float, int, int]] = []  # (time, in flight, over) every SAMPLE_S
        self.models = 0
        self.statuses: dict[str, int] = {}
        self.markers: dict[bytes, int] = {}
        self.global_faults = 0

    # -- routing -----------------------------------------------------------------------------
    def handle(
        self, proto: HttpProtocol, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> None:
        path, _, query = path.partition("?")
        if path == "/v1/chat/completions" and method == "POST":
            self.chat += 1
            self.arrivals.append(time.monotonic())
            cap = self.config["max_in_flight"]
            if cap is not None and self.in_flight >= int(cap):
                self.over += 1
                message = f"too many requests in flight (limit {cap})"
                self.statuses["429"] = self.statuses.get("429", 0) + 1
                proto.respond(429, json.dumps(_error(message, "rate_limit_exceeded")).encode(),
                              {"retry-after": "0"})  # fmt: skip
                return
            self.in_flight += 1
            proto.on_answer = self.answered
            self.chat_completion(proto, headers, body)
        elif path == "/v1/models" and method == "GET":
            self.models += 1
            if not self.authorised(proto, headers):
                return
            model = {"id": self.config["model"], "object": "model", "created": 0, "owned_by": "tests"}
            self.send(proto, 200, {"object": "list", "data": [model]})
        elif path == "/_stats":
            stats = {
                "chat": self.chat,
                "models": self.models,
                "statuses": self.statuses,
                "markers": {k.decode(): v for k, v in self.markers.items()},
            }
            if query == "arrivals=1":
                stats["arrivals"] = self.arrivals
            if query == "samples=1":
                stats["samples"] = self.samples
            proto.respond(200, json.dumps(stats).encode())
        elif path == "/_reset" and method == "POST":
            self.reset()
            proto.respond(200, b"{}")
        elif path == "/_config" and method == "POST":
            self.config.update(json.loads(body or b"{}"))
            proto.respond(200, json.dumps(self.config).encode())
        else:
            self.send(proto, 404, _error(f"no route {method} {path}", "not_found"))

    def send(
        self,
        proto: HttpProtocol,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> None:
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        data = raw if raw is not None else json.dumps(payload).encode()
        latency = self.config["latency_s"]
        if latency > 0:
            asyncio.get_running_loop().call_later(latency, proto.respond, status, data, headers)
        else:
            proto.respond(status, data, headers)

    def authorised(self, proto: HttpProtocol, headers: dict[str, str]) -> bool:
        want = self.config["api_key"]
        if want is None:
            return True
        given = headers.get("authorization", "")
        if given == f"Bearer {want}":
            return True
        provided = given.removeprefix("Bearer ")
        self.send(proto, 401, _error(f"Incorrect API key provided: {provided}.", "invalid_api_key"))
        return False

    async def sample(self) -> None:
        """Every ``SAMPLE_S``, while chat requests came in the last second: (time, in flight, 429s
        for ``max_in_flight`` so far)."""
        while True:
            await asyncio.sleep(SAMPLE_S)
            now = time.monotonic()
            if self.arrivals and now - self.arrivals[-1] < 1.0:
                self.samples.append((now, self.in_flight, self.over))

    def answered(self) -> None:
        """A chat request admitted under ``max_in_flight`` got its answer (or lost its connection)."""
        self.in_flight -= 1

    # -- chat --------------------------------------------------------------------------------
    def fault_for(self, body: bytes) -> str | None:
        config = self.config
        if config["fault"]:
            limit = int(config["fault_count"])
            if limit == 0 or self.global_faults < limit:
                self.global_faults += 1
                return str(config["fault"])
        if b"[[fault" not in body:
            return None
        for found in _MARKER.finditer(body):
            marker = found.group(0)
            limit = int(found.group(2) or 1)
            seen = self.markers.get(marker, 0)
            self.markers[marker] = seen + 1
            if limit == 0 or seen < limit:
                return found.group(1).decode()
        return None

    def chat_completion(self, proto: HttpProtocol, headers: dict[str, str], body: bytes) -> None:
        if not self.authorised(proto, headers):
            return
        config = self.config
        if config["strict_model"]:
            model = json.loads(body).get("model")
            if model != config["model"]:
                self.send(proto, 404, _error(f"The model `{model}` does not exist.", "model_not_found"))
                return
        fault = self.fault_for(body)
        content, finish = self.answer(body, self.config["plain_answers"]), "stop"
        if fault is not None:
            if fault.isdigit():
                status = int(fault)
                extra: dict[str, str] = {}
                if status == 429:
                    if config["retry_after"] is not None:
                        extra["retry-after"] = str(config["retry_after"])
                    if config["retry_after_ms"] is not None:
                        extra["retry-after-ms"] = str(config["retry_after_ms"])
                self.send(proto, status, _error(f"injected HTTP {status}", "injected"), extra)
                return
            if fault == "quota":
                message = "You exceeded your current quota, please check your plan and billing details."
                self.send(proto, 429, _error(message, "insufficient_quota"))
                return
            if fault == "ctxlen":
                message = "This model's maximum context length is 8192 tokens."
                self.send(proto, 400, _error(message, "context_length_exceeded"))
                return
            if fault == "hang":
                asyncio.get_running_loop().call_later(float(config["hang_s"]), proto.close)
                return
            if fault == "drop":
                proto.close()
                return
            if fault == "malformed":
                self.send(proto, 200, None, raw=b'{"id": "chatcmpl-x", "choices": [{"message": {"conte')
                return
            if fault == "refuse":
                content = "I'm sorry, but I can't help with that request."
            elif fault == "filter":
                content, finish = "", "content_filter"
            elif fault == "truncate":
                content, finish = content[: len(content) // 2], "length"
            elif fault == "notags":
                content = config["notags_text"]
        usage_in = len(body) // 4
        usage_out = max(1, len(content) // 4)
        response = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": config["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": usage_in,
                "completion_tokens": usage_out,
                "total_tokens": usage_in + usage_out,
            },
        }
        extra = None
        if config["ratelimit"]:
            extra = {f"x-ratelimit-{k}": str(v) for k, v in config["ratelimit"].items()}
        self.send(proto, 200, response, extra)

    @staticmethod
    def answer(body: bytes, plain: bool = False) -> str:
        if plain and not _CATEGORY.search(body):  # a plain-text request (a companion writer's)
            seed = _SEED.search(body)
            word = _WORDS[int(seed.group(1)) % len(_WORDS) if seed else 0].decode()
            return f"Here is a calm and helpful answer about {word}, without any insult."
        found = _CATEGORY.search(body)
        category = found.group(1).decode().strip() if found else "Toxic"
        seed = _SEED.search(body)
        word = _WORDS[int(seed.group(1)) % len(_WORDS) if seed else 0].decode()
        return (
            f" Honestly, forget that. <harmful> You are a clueless idiot about {word}.</harmful>"
            f"<category>{category}</category>"
        )


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


class HttpProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 with keep-alive and Content-Length bodies; one request at a time."""

    def __init__(self, app: App):
        self.app = app
        self.buffer = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.on_answer: Any = None  # called once when the request under way is answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.answer_done()

    def answer_done(self) -> None:
        if self.on_answer is not None:
            done, self.on_answer = self.on_answer, None
            done()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.process()

    def process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            size = int(headers.get("content-length", "0") or 0)
            if len(self.buffer) < end + 4 + size:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + size])
            del self.buffer[: end + 4 + size]
            self.busy = True
            self.app.handle(self, method, path, headers, body)

    def respond(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.answer_done()
        if self.transport is None:
            return
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "connection: keep-alive",
        ]
        if headers:
            head.extend(f"{k}: {v}" for k, v in headers.items())
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self.busy = False
        self.process()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(port: int, config: dict[str, Any]) -> None:
    """Serve until killed; print ``PORT n`` once listening; exit when the parent process dies."""
    loop = asyncio.get_running_loop()
    app = App(config)
    sampler = asyncio.ensure_future(app.sample())  # noqa: F841 - runs as long as the server
    server = await loop.create_server(lambda: HttpProtocol(app), "127.0.0.1", port, backlog=4096)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(0.5)


class ServerProcess:
    """Start the server in a child process; a context manager."""

    def __init__(self, **config: Any):
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL for OpenAI clients (``…/v1``)."""
        return f"{self.root}/v1"

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--config", json.dumps(self.config)],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"test server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def _call(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.root + path, data=data, method="GET" if data is None else "POST"
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        """Counters: ``chat`` and ``models`` requests, ``statuses`` sent, ``markers`` seen."""
        return self._call("/_stats")

    def samples(self) -> list[tuple[float, int, int]]:
        """(time, chat requests in flight, 429s for ``max_in_flight`` so far) every 20 ms while
        chat requests come in."""
        return [tuple(sample) for sample in self._call("/_stats?samples=1")["samples"]]  # type: ignore[misc]

    def arrivals(self) -> list[float]:
        """When each chat request arrived (the server's ``time.monotonic()``), in order."""
        return self._call("/_stats?arrivals=1")["arrivals"]

    def reset(self, **config: Any) -> None:
        """Zero the counters and restore the start configuration (plus ``config``)."""
        self._call("/_reset", {})
        self._call("/_config", {**DEFAULTS, **self.config, **config})

    def configure(self, **config: Any) -> dict[str, Any]:
        """Change configuration keys."""
        return self._call("/_config", config)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", default="{}", help="JSON config (see module docstring)")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port, json.loads(args.config)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
