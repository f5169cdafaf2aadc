"""A small, fast OpenAI-compatible server for tests and benchmarks (127.0.0.1, random port).

Run it in a separate process with ``ServerProcess`` (so it never shares the GIL with the client)::

    with ServerProcess(latency_s=0.05) as server:
        server.url          # "http://127.0.0.1:PORT/v1"
        server.stats()      # {"chat": 12, "models": 1, "statuses": {"200": 11, "429": 1}, ...}
        server.arrivals()   # when each chat request arrived (for rate-limit checks)
        server.reset()      # zero the counters
        server.configure(api_key="sk-test", retry_after="1")

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, the Batch API (``POST /v1/files``,
``GET /v1/files/{id}/content``, ``POST``/``GET /v1/batches``, ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``: see ``BatchAPI``), and the control endpoints ``GET /_stats``,
``POST /_reset``, ``POST /_config`` (not counted as requests). ``python openai_server.py
--run-batch IN OUT`` answers a Batch input file offline, as ``vllm run-batch`` does.

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
every 20 ms while chat requests come in), ``judge_words`` (requests with the LLM judge's ``<<<``
answer ``>>>`` prompt get a JSON verdict: violating from the first of these words),
``batch_delay_s``, ``batch_expire_percent``, ``batch_fail``, ``upload_status``,
``batch_create_delay_s`` (see ``BatchAPI``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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
    "judge_words": None,
    # the Batch API (see ``BatchAPI``)
    "batch_delay_s": 0.0,
    "batch_expire_percent": 0,
    "batch_fail": False,
    "batch_create_delay_s": 0.0,
    "upload_status": None,
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
        self.batch = BatchAPI(self)

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
        elif path.startswith(("/v1/files", "/v1/batches")):
            if self.authorised(proto, headers):
                self.batch.handle(proto, method, path, query, headers, body)
        elif path == "/_stats":
            stats = {
                "chat": self.chat,
                "models": self.models,
                "statuses": self.statuses,
                "markers": {k.decode(): v for k, v in self.markers.items()},
                **self.batch.stats(),
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
        status, payload, extra, action = self.chat_result(body)
        if action == "hang":
            asyncio.get_running_loop().call_later(float(self.config["hang_s"]), proto.close)
        elif action == "drop":
            proto.close()
        elif action == "malformed":
            self.send(proto, 200, None, raw=b'{"id": "chatcmpl-x", "choices": [{"message": {"conte')
        else:
            self.send(proto, status, payload, extra)

    def chat_result(self, body: bytes) -> tuple[int, Any, dict[str, str] | None, str | None]:
        """(status, payload, headers, action) of a chat request: what the chat endpoint answers and
        the batch executor writes; ``action`` is ``hang``, ``drop`` or ``malformed`` for those faults."""
        config = self.config
        if config["strict_model"]:
            model = json.loads(body).get("model")
            if model != config["model"]:
                return 404, _error(f"The model `{model}` does not exist.", "model_not_found"), None, None
        fault = self.fault_for(body)
        content, finish = self.answer(body, self.config["plain_answers"]), "stop"
        if config["judge_words"] and b"<<<" in body:  # the LLM judge's prompt
            content = judge_verdict(body, config["judge_words"])
        if fault is not None:
            if fault.isdigit():
                status = int(fault)
                extra: dict[str, str] = {}
                if status == 429:
                    if config["retry_after"] is not None:
                        extra["retry-after"] = str(config["retry_after"])
                    if config["retry_after_ms"] is not None:
                        extra["retry-after-ms"] = str(config["retry_after_ms"])
                return status, _error(f"injected HTTP {status}", "injected"), extra, None
            if fault == "quota":
                message = "You exceeded your current quota, please check your plan and billing details."
                return 429, _error(message, "insufficient_quota"), None, None
            if fault == "ctxlen":
                message = "This model's maximum context length is 8192 tokens."
                return 400, _error(message, "context_length_exceeded"), None, None
            if fault in ("hang", "drop", "malformed"):
                return 0, None, None, fault
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
        return 200, response, extra, None

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


class BatchAPI:
    """``/v1/files`` and ``/v1/batches`` over the chat endpoint: each line is answered exactly as
    ``POST /v1/chat/completions`` would answer its body (the same faults by marker, too).

    A batch is ``validating`` then ``in_progress`` until ``batch_delay_s`` after it was made; the
    first retrieve after that runs its lines: answers go to the output file, failed lines (non-200,
    or a ``hang``/``drop``/``malformed`` fault: 500) to the error file. ``batch_expire_percent``
    of the lines (by custom_id, each custom_id at most once) expire (``batch_expired`` in the error
    file, batch status ``expired``); ``batch_fail`` fails whole batches (status ``failed``, no
    files); ``upload_status`` refuses uploads with that HTTP status; ``batch_create_delay_s`` makes a
    batch at once but answers its create request that much later. ``cancel`` makes a batch
    ``cancelling``, then ``cancelled`` with no line answered.
    """

    def __init__(self, app: App):
        self.app = app
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.made: dict[str, float] = {}  # batch id -> when it was made (monotonic)
        self.expired: set[str] = set()
        self.uploads = 0
        self.lines = 0  # lines answered by batches
        self.line_ids: list[list[str]] = []  # custom_ids of each created batch

    def stats(self) -> dict[str, Any]:
        return {
            "uploads": self.uploads,
            "batches": len(self.batches),
            "batch_lines": self.lines,
            "batch_sizes": [len(ids) for ids in self.line_ids],
            "batch_ids": self.line_ids,
            "expired": sorted(self.expired),
        }

    def handle(
        self, proto: HttpProtocol, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> None:
        send = self.app.send
        parts = path.strip("/").split("/")  # v1, files|batches, id, content|cancel
        if parts == ["v1", "files"] and method == "POST":
            status = self.app.config["upload_status"]
            if status:
                send(proto, int(status), _error("injected upload refusal", "injected"))
                return
            form = _multipart(headers.get("content-type", ""), body)
            if form.get("purpose") != b"batch" or "file" not in form:
                send(proto, 400, _error("need purpose=batch and a file", "invalid_request"))
                return
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = form["file"]
            self.uploads += 1
            send(
                proto, 200, {"id": file_id, "object": "file", "bytes": len(form["file"]), "purpose": "batch"}
            )
        elif len(parts) == 4 and parts[1] == "files" and parts[3] == "content" and method == "GET":
            data = self.files.get(parts[2])
            if data is None:
                send(proto, 404, _error("no such file", "not_found"))
            else:
                send(proto, 200, None, raw=data)
        elif parts == ["v1", "batches"] and method == "POST":
            request = json.loads(body or b"{}")
            data = self.files.get(request.get("input_file_id", ""))
            if data is None:
                send(proto, 400, _error("no such input file", "invalid_request"))
                return
            batch_id = f"batch-{len(self.batches) + 1}"
            lines = [json.loads(line)["custom_id"] for line in data.splitlines() if line.strip()]
            self.line_ids.append(lines)
            self.made[batch_id] = time.monotonic()
            self.batches[batch_id] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": request.get("endpoint"),
                "input_file_id": request["input_file_id"],
                "completion_window": request.get("completion_window"),
                "metadata": request.get("metadata") or {},
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "errors": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            }
            delay = float(self.app.config["batch_create_delay_s"])
            if delay > 0:  # made now, answered later: a client killed meanwhile never learns its id
                data = json.dumps(self.batches[batch_id]).encode()
                asyncio.get_running_loop().call_later(delay, proto.respond, 200, data, None)
            else:
                send(proto, 200, self.batches[batch_id])
        elif parts == ["v1", "batches"] and method == "GET":
            send(proto, 200, {"object": "list", "data": list(reversed(self.batches.values()))})
        elif len(parts) >= 3 and parts[1] == "batches" and parts[2] in self.batches:
            batch = self.batches[parts[2]]
            if len(parts) == 4 and parts[3] == "cancel" and method == "POST":
                if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                    batch["status"] = "cancelling"
                send(proto, 200, batch)
            elif len(parts) == 3 and method == "GET":
                self.advance(batch)
                send(proto, 200, batch)
            else:
                send(proto, 404, _error(f"no route {method} {path}", "not_found"))
        else:
            send(proto, 404, _error(f"no route {method} {path}", "not_found"))

    def advance(self, batch: dict[str, Any]) -> None:
        status = batch["status"]
        if status == "cancelling":
            batch["status"] = "cancelled"
            return
        if status not in ("validating", "in_progress"):
            return
        if time.monotonic() - self.made[batch["id"]] < float(self.app.config["batch_delay_s"]):
            batch["status"] = "in_progress"
            return
        if self.app.config["batch_fail"]:
            batch["status"] = "failed"
            batch["errors"] = {"data": [{"code": "injected", "message": "injected batch failure"}]}
            return
        outputs, errors = self.run(self.files[batch["input_file_id"]])
        counts = batch["request_counts"]
        counts["completed"], counts["failed"] = len(outputs), len(errors)
        expired = any(b'"batch_expired"' in line for line in errors)
        batch["status"] = "expired" if expired else "completed"
        for key, lines in (("output_file_id", outputs), ("error_file_id", errors)):
            if lines:
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = b"".join(lines)
                batch[key] = file_id

    def run(self, data: bytes) -> tuple[list[bytes], list[bytes]]:
        """(output lines, error lines) of an input file."""
        outputs, errors = [], []
        percent = int(self.app.config["batch_expire_percent"])
        for number, line in enumerate(data.splitlines()):
            if not line.strip():
                continue
            item = json.loads(line)
            key = item["custom_id"]
            result: dict[str, Any] = {
                "id": f"batch_req_{number}",
                "custom_id": key,
                "response": None,
                "error": None,
            }
            digest = int(hashlib.sha256(key.encode()).hexdigest(), 16)
            if percent and digest % 100 < percent and key not in self.expired:
                self.expired.add(key)
                message = "This request could not be executed before the completion window expired."
                result["error"] = {"code": "batch_expired", "message": message}
                errors.append(json.dumps(result).encode() + b"\n")
                continue
            if item.get("url") != "/v1/chat/completions":
                result["response"] = {"status_code": 404, "body": _error("unsupported url", "not_found")}
                errors.append(json.dumps(result).encode() + b"\n")
                continue
            status, payload, _, action = self.app.chat_result(raw_body(line))
            if action is not None:
                status, payload = 500, _error(f"injected {action}", "injected")
            self.lines += 1
            result["response"] = {"status_code": status, "request_id": f"req_{number}", "body": payload}
            (outputs if status == 200 else errors).append(json.dumps(result).encode() + b"\n")
        return outputs, errors


def judge_verdict(body: bytes, words: list[str]) -> str:
    """The LLM judge's JSON verdict on the answer between ``<<<`` and ``>>>``: violating from the
    first of ``words`` in it (that is where its span starts)."""
    prompt = json.loads(body)["messages"][-1]["content"]
    answer = prompt.split("<<<\n", 1)[-1].rsplit("\n>>>", 1)[0]
    found = [m.start() for w in words if (m := re.search(r"(?<![0-9a-z])" + re.escape(w), answer.lower()))]
    start = min(found) if found else None
    verdict = {
        "violating": start is not None,
        "span": answer[start:] if start is not None else "",
        "category": "Harassment" if start is not None else "",
        "safe_edit": "[a safe rewrite]",
    }
    return json.dumps(verdict)


def raw_body(line: bytes) -> bytes:
    """The ``body`` of an input line as its bytes (the request exactly as it would be sent)."""
    start = line.index(b'"body":') + len(b'"body":')
    text = line.decode("utf-8")
    begin = len(line[:start].decode("utf-8"))
    _, end = json.JSONDecoder().raw_decode(text, begin)
    return text[begin:end].encode("utf-8")


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body (name -> bytes)."""
    boundary = content_type.partition("boundary=")[2].strip('"')
    fields: dict[str, bytes] = {}
    for part in body.split(b"--" + boundary.encode()):
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        found = re.search(rb'name="([^"]+)"', head)
        if found:
            fields[found.group(1).decode()] = content[:-2] if content.endswith(b"\r\n") else content
    return fields


def run_batch(input_path: str, output_path: str, config: dict[str, Any]) -> None:
    """Answer a Batch input file offline, as ``vllm run-batch -i IN -o OUT`` does (one output file
    with every line's result)."""
    app = App(config)
    with open(input_path, "rb") as handle:
        outputs, errors = app.batch.run(handle.read())
    with open(output_path, "wb") as handle:
        handle.write(b"".join(outputs + errors))


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
    parser.add_argument("--run-batch", nargs=2, metavar=("IN", "OUT"), help="answer a Batch file offline")
    args = parser.parse_args()
    if args.run_batch:
        run_batch(*args.run_batch, json.loads(args.config))
        return
    try:
        asyncio.run(serve(args.port, json.loads(args.config)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
