"""Batch mode: an endpoint's calls travel as Batch API files instead of one HTTP request each.

An endpoint in ``mode: batch`` parks each call its cache misses (``BatchQueue.send``: the line
``{"custom_id": <cache key>, "method": "POST", "url": ..., "body": <the canonical body>}``) instead
of sending it. The build goes on as online until nothing can move: every task of the engine waits
on a parked call and the flow has said it is idle (``BatchHub.check``). Then the parked lines are
written as JSONL files (at most ``max_requests_per_file`` lines and ``max_bytes_per_file`` bytes
each, one request path per file), uploaded (``POST /files``, ``purpose=batch``), submitted
(``POST /batches``) and polled (``GET /batches/{id}`` every ``poll_interval_s``); the output and
error files are read back and every parked call gets its answer, which the engine stores in the
response cache exactly as an online answer. Methods whose steps depend on each other (a judge, then
a continuation) run in rounds, one batch per round and endpoint.

State: each batch has a JSON file in the build's work folder (``BatchOptions.folder``), written
atomically before each step that a kill could lose (before the upload: its custom ids; after it:
the file id; after the submit: the batch id) and when it ends (with its output and error files
saved beside it). A re-run re-attaches: a submitted batch is polled, not submitted again (an
upload whose submit was not recorded is found by its ``metadata`` or submitted once); an ended
batch serves its answers, and its unanswered lines are asked again. Lines that fail (``expired``,
an error line, a failed batch) fail their call as transient: the build is incomplete (exit 3) and
the next run submits exactly those. A batch cancelled (``bsafe-data batches cancel``) stops the
build; the next run submits its unanswered lines again.

Offline engines: ``export_to`` writes the parked lines to one file (for ``vllm run-batch``) and stops
the build (``BatchExported``); ``import_from`` reads such an engine's output file, whose answers
serve any endpoint's cache misses.

The API key lives in the HTTP session only: state files hold the name of its environment variable.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bsafe_data.llm.errors import FatalEndpointError, RequestFailed, redact

STATE_FORMAT = 1
#: batch statuses after which nothing changes
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
#: per-line statuses a re-run could answer differently (others: the endpoint refused that request)
_TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})
#: HTTP statuses of the batch API worth asking again
_RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_ATTEMPTS = 4
#: polls in a row that may fail (connection errors, 5xx) before the build stops
_POLL_FAILURES = 10
#: how long a stall must last, with no call parked meanwhile, before a round is submitted
_SETTLE_S = 0.05


class BatchExported(FatalEndpointError):
    """The parked calls were written to ``--batch-export``'s file: the build stops (exit 4)."""

    def __init__(self, message: str):
        RuntimeError.__init__(self, message)
        self.role, self.endpoint, self.status, self.message = "batch", "", None, message


class BatchImportError(FatalEndpointError):
    """``--batch-import``'s file cannot be read: the build stops (exit 1)."""

    def __init__(self, message: str):
        RuntimeError.__init__(self, message)
        self.role, self.endpoint, self.status, self.message = "batch", "", None, message


class BatchCancelled(FatalEndpointError):
    """A batch the build waits for was cancelled: the build stops; a re-run submits its rest."""

    def __init__(self, message: str):
        RuntimeError.__init__(self, message)
        self.role, self.endpoint, self.status, self.message = "batch", "", None, message


@dataclass(frozen=True)
class BatchOptions:
    """Where batch state lives and the recipe's ``batch`` settings (``recipe.BatchSpec``)."""

    folder: Path | None = None
    poll_interval_s: float = 60.0
    max_requests_per_file: int = 50_000
    max_bytes_per_file: int = 200_000_000
    completion_window: str = "24h"
    export_to: Path | None = None
    import_from: Path | None = None

    @classmethod
    def of(cls, spec: Any, folder: Path | None, **flags: Any) -> BatchOptions:
        """Options from a ``recipe.BatchSpec`` (read by its fields) and the build's flags."""
        return cls(
            folder,
            spec.poll_interval_s,
            spec.max_requests_per_file,
            spec.max_bytes_per_file,
            spec.completion_window,
            **flags,
        )


@dataclass(frozen=True)
class Outcome:
    """One line's result: the 200 body, or why there is none (``final``: the endpoint refused it)."""

    body: bytes | None
    reason: str = ""
    final: bool = False

    def result(self) -> bytes:
        """The body, or ``RequestFailed`` (transient unless ``final``)."""
        if self.body is None:
            raise RequestFailed(self.reason, 1, final=self.final)
        return self.body


# -- files ---------------------------------------------------------------------------------------


def request_line(key: str, url: str, body: bytes) -> bytes:
    """One input line (``body`` is canonical JSON: it goes in as it is sent online)."""
    head = json.dumps({"custom_id": key, "method": "POST", "url": url}, separators=(",", ":"))
    return head[:-1].encode() + b',"body":' + body + b"}\n"


def read_outcomes(data: bytes, where: str) -> dict[str, Outcome]:
    """custom_id -> Outcome of an output or error file (``vllm run-batch`` writes the same lines).

    ``ValueError`` naming ``where`` and the line number for a line that is not a result line."""
    found: dict[str, Outcome] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key = item["custom_id"]
            if not isinstance(key, str):
                raise TypeError("custom_id is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{where} line {number} is not a batch result line ({type(exc).__name__})"
            ) from None
        found[key] = _outcome(item)
    return found


def _outcome(item: dict[str, Any]) -> Outcome:
    response = item.get("response") if isinstance(item.get("response"), dict) else None
    error = item.get("error")
    status = response.get("status_code") if response else None
    if status == 200 and not error:
        body = response.get("body")  # type: ignore[union-attr]
        text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
        return Outcome(text.encode())
    if isinstance(error, dict):
        what = str(error.get("code") or error.get("message") or "error")
    elif status is not None:
        what = f"HTTP {status}"
    else:
        what = str(error or "no response")
    final = isinstance(status, int) and 400 <= status < 500 and status not in _TRANSIENT_STATUSES
    return Outcome(None, redact(f"batch line failed: {what}", limit=200), final)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # workers share folders
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class BatchState:
    """One batch as its state file records it."""

    name: str
    role: str
    endpoint: str  # the public base URL (no credentials)
    api_key_env: str
    path: str  # the request path under the base URL
    custom_ids: list[str]
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str = "writing"
    counts: dict[str, int] = field(default_factory=dict)
    done: bool = False
    failed: dict[str, str] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        """Write the state file atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        data = {"format": STATE_FORMAT, **self.__dict__}
        _write_atomic(folder / f"{self.name}.json", json.dumps(data).encode())

    def output_paths(self, folder: Path) -> tuple[Path, Path]:
        """Where its output and error files are saved."""
        return folder / f"{self.name}.output.jsonl", folder / f"{self.name}.errors.jsonl"


def load_states(folder: Path | None) -> list[BatchState]:
    """The batch state files of ``folder`` (none when it does not exist), oldest first; files of
    another format or that do not read are skipped."""
    if folder is None or not folder.is_dir():
        return []
    states = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(path.read_text())
            if data.pop("format", None) != STATE_FORMAT:
                continue
            states.append(BatchState(**data))
        except (OSError, ValueError, TypeError):
            continue
    return states


def split_files(
    lines: list[tuple[str, bytes]], max_requests: int, max_bytes: int
) -> Iterator[list[tuple[str, bytes]]]:
    """Consecutive groups of (key, line) of at most ``max_requests`` lines and ``max_bytes`` bytes
    (a single longer line is a group of its own)."""
    group: list[tuple[str, bytes]] = []
    size = 0
    for key, line in lines:
        if group and (len(group) >= max_requests or size + len(line) > max_bytes):
            yield group
            group, size = [], 0
        group.append((key, line))
        size += len(line)
    if group:
        yield group


# -- the Batch API -------------------------------------------------------------------------------


class BatchAPIError(Exception):
    """The batch API refused a request (``status`` None: no answer)."""

    def __init__(self, status: int | None, message: str):
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)


class BatchAPI:
    """``/files`` and ``/batches`` of one endpoint (open with ``async with``)."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BatchAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._api_key}"},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, connect=30.0),
            )
        return self._session

    async def _request(self, method: str, path: str, *, data: Any = None, payload: Any = None) -> bytes:
        session = self._open()
        delay = 1.0
        for attempt in range(1, _ATTEMPTS + 1):
            body = data() if callable(data) else data
            try:
                async with session.request(method, self.base_url + path, data=body, json=payload) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                status, raw = None, f"connection error ({type(exc).__name__})".encode()
            if status == 200:
                return raw
            if attempt == _ATTEMPTS or (status is not None and status not in _RETRY_STATUSES):
                raise BatchAPIError(status, self._message(raw))
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _message(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            error = data.get("error", data) if isinstance(data, dict) else data
            message = error.get("message", "") if isinstance(error, dict) else str(error)
        except ValueError:
            message = raw[:300].decode("utf-8", "replace")
        return redact(str(message), self._api_key)

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        raw = await self._request(method, path, **kwargs)
        try:
            data = json.loads(raw)
        except ValueError:
            raise BatchAPIError(200, "the answer is not JSON") from None
        if not isinstance(data, dict):
            raise BatchAPIError(200, "the answer is not a JSON object")
        return data

    async def upload(self, name: str, content: bytes) -> str:
        """``POST /files`` (purpose ``batch``): the file id."""

        def form() -> aiohttp.FormData:
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", content, filename=f"{name}.jsonl", content_type="application/jsonl")
            return data

        return str((await self._json("POST", "/files", data=form))["id"])

    async def create(self, file_id: str, endpoint: str, window: str, name: str) -> dict[str, Any]:
        """``POST /batches``: the batch object."""
        payload = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": window,
            "metadata": {"bsafe_batch": name},
        }
        return await self._json("POST", "/batches", payload=payload)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        """``GET /batches/{id}``: the batch object."""
        return await self._json("GET", f"/batches/{batch_id}")

    async def find(self, name: str, file_id: str) -> dict[str, Any] | None:
        """The batch made from ``file_id`` (or tagged ``name``) among the latest ones, if any."""
        listed = await self._json("GET", "/batches?limit=100")
        for item in listed.get("data") or []:
            meta = item.get("metadata") or {}
            if item.get("input_file_id") == file_id or meta.get("bsafe_batch") == name:
                return item
        return None

    async def content(self, file_id: str) -> bytes:
        """``GET /files/{id}/content``."""
        return await self._request("GET", f"/files/{file_id}/content")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """``POST /batches/{id}/cancel``: the batch object."""
        return await self._json("POST", f"/batches/{batch_id}/cancel")


# -- a build's batches ---------------------------------------------------------------------------


class BatchQueue:
    """The batch side of one endpoint: parked calls, its batches, the answers read back."""

    def __init__(self, hub: BatchHub, role: str, base_url: str, api_key: str, public: str, api_key_env: str):
        self.hub = hub
        self.role = role
        self.public = public
        self.api_key_env = api_key_env
        self.api = BatchAPI(base_url, api_key)
        self._prefix = urlsplit(base_url).path.rstrip("/")
        self.pending: dict[str, tuple[str, bytes]] = {}  # key -> (path, body), not yet submitted
        self._waiters: dict[str, asyncio.Future[bytes]] = {}
        self._submitted: dict[str, str] = {}  # key -> name of its open batch
        self._held: dict[str, tuple[str, bytes]] = {}  # (path, body) of calls waiting on one
        self._answers: dict[str, Outcome] = {}  # answered lines nobody has asked for yet
        self.batches: dict[str, BatchState] = {}
        self._polls: dict[str, asyncio.Task[None]] = {}
        self._resumed: list[BatchState] = []
        for state in load_states(hub.options.folder):
            if state.role == role and state.endpoint == public:
                self._attach(state)

    # -- state of earlier runs ---------------------------------------------------------------
    def _attach(self, state: BatchState) -> None:
        folder = self.hub.options.folder
        assert folder is not None
        if state.done:
            for path in state.output_paths(folder):
                try:
                    outcomes = read_outcomes(path.read_bytes(), str(path))
                except (OSError, ValueError):
                    continue
                self._answers.update((k, o) for k, o in outcomes.items() if o.body is not None)
            self.batches[state.name] = state
            return
        if state.input_file_id is None:  # nothing was uploaded: its lines are asked again
            (folder / f"{state.name}.json").unlink(missing_ok=True)
            return
        self.batches[state.name] = state
        self._submitted.update((key, state.name) for key in state.custom_ids)
        self._resumed.append(state)

    def _start(self) -> None:
        """Poll the batches of an earlier run (on the loop, once)."""
        while self._resumed:
            state = self._resumed.pop()
            self._polls[state.name] = asyncio.ensure_future(self._follow(state, resumed=True))

    # -- calls ---------------------------------------------------------------------------------
    async def send(self, key: str, path: str, body: bytes) -> bytes:
        """The 200 body of the call ``key``: from a batch of an earlier run, or parked until the
        next round's batch answers it. ``RequestFailed`` for a line that failed."""
        self._start()
        found = self._answers.pop(key, None)
        if found is not None:
            return found.result()
        waiter = self._waiters.get(key)
        if waiter is None:
            waiter = self._waiters[key] = asyncio.get_running_loop().create_future()
            if key in self._submitted:
                self._held[key] = (path, body)
            else:
                self.pending[key] = (path, body)
        try:
            return await waiter
        finally:
            if self._waiters.get(key) is waiter and waiter.done():
                del self._waiters[key]

    def _resolve(self, key: str, outcome: Outcome) -> None:
        self._held.pop(key, None)
        waiter = self._waiters.pop(key, None)
        if waiter is None or waiter.done():
            if outcome.body is not None:
                self._answers[key] = outcome
            return
        if outcome.body is None:
            waiter.set_exception(RequestFailed(outcome.reason, 1, final=outcome.final))
        else:
            waiter.set_result(outcome.body)

    def _fail_all(self, keys: Iterable[str], exc: BaseException) -> None:
        for key in keys:
            self.pending.pop(key, None)
            self._held.pop(key, None)
            waiter = self._waiters.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)

    def take_lines(self) -> list[tuple[str, str, bytes]]:
        """The parked calls as (key, path, line), taken out of ``pending``."""
        pending, self.pending = self.pending, {}
        return [
            (key, path, request_line(key, self._prefix + path, body)) for key, (path, body) in pending.items()
        ]

    # -- submitting ----------------------------------------------------------------------------
    async def submit(self) -> None:
        """Submit the parked calls: one batch per request path and file limit."""
        lines = self.take_lines()
        options = self.hub.options
        by_path: dict[str, list[tuple[str, bytes]]] = {}
        for key, path, line in lines:
            by_path.setdefault(path, []).append((key, line))
        for path, group in by_path.items():
            for part in split_files(group, options.max_requests_per_file, options.max_bytes_per_file):
                name = f"{_slug(self.role)}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
                state = BatchState(name, self.role, self.public, self.api_key_env, path, [k for k, _ in part])
                self.batches[name] = state
                self._submitted.update((key, name) for key, _ in part)
                try:
                    await self._submit(state, b"".join(line for _, line in part))
                except Exception as exc:  # the calls of this file fail; the build stops
                    self._fail_all(state.custom_ids, self._stop(exc))
                    continue
                self._polls[name] = asyncio.ensure_future(self._follow(state))

    def _stop(self, exc: Exception) -> FatalEndpointError:
        """``exc`` as the error that stops the build (with a one-line message)."""
        if isinstance(exc, FatalEndpointError):
            return exc
        if isinstance(exc, OSError):
            text = f"batch state in {self.hub.options.folder}: {exc.strerror or exc}"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return FatalEndpointError(self.role, self.public, None, text)

    async def _submit(self, state: BatchState, content: bytes) -> None:
        self._save(state)
        try:
            state.input_file_id = await self.api.upload(state.name, content)
        except BatchAPIError as exc:
            self._forget(state)
            raise self._fatal("upload of a batch file", exc) from None
        state.status = "uploaded"
        self._save(state)
        await self._create(state)

    async def _create(self, state: BatchState) -> None:
        assert state.input_file_id is not None
        url = self._prefix + state.path
        try:
            batch = await self.api.create(
                state.input_file_id, url, self.hub.options.completion_window, state.name
            )
        except BatchAPIError as exc:
            self._forget(state)
            raise self._fatal("submitting a batch", exc) from None
        state.batch_id = str(batch["id"])
        state.status = str(batch.get("status") or "validating")
        self._save(state)
        self.hub.submitted += 1

    def _forget(self, state: BatchState) -> None:
        """A batch that was never submitted: its state goes, its lines are asked again next run."""
        self.batches.pop(state.name, None)
        for key in state.custom_ids:
            self._submitted.pop(key, None)
        if self.hub.options.folder is not None:
            (self.hub.options.folder / f"{state.name}.json").unlink(missing_ok=True)

    def _fatal(self, what: str, exc: BatchAPIError) -> FatalEndpointError:
        return FatalEndpointError(self.role, self.public, exc.status, f"{what} refused: {exc.message}")

    def _save(self, state: BatchState) -> None:
        if self.hub.options.folder is not None:
            state.save(self.hub.options.folder)

    # -- following a batch -----------------------------------------------------------------
    async def _follow(self, state: BatchState, resumed: bool = False) -> None:
        """Poll a submitted batch until it ends, then read its files and answer its calls (those
        it did not answer: see ``_finish``)."""
        try:
            if state.batch_id is None:  # uploaded, but the submit was not recorded
                found = await self.api.find(state.name, state.input_file_id or "")
                if found is None:
                    await self._create(state)
                else:
                    state.batch_id = str(found["id"])
                    self._save(state)
            batch, first = await self._poll(state)
            outcomes: dict[str, Outcome] = {}
            saved = state.output_paths(self.hub.options.folder) if self.hub.options.folder else (None, None)
            for file_key, path in zip(("output_file_id", "error_file_id"), saved, strict=True):
                file_id = batch.get(file_key)
                if not file_id:
                    continue
                data = await self.api.content(str(file_id))
                outcomes.update(read_outcomes(data, f"{file_key} {file_id}"))
                if path is not None:
                    _write_atomic(path, data)
            # a batch of an earlier run asks again what it did not answer, unless it was cancelled
            # while this run waited
            again = resumed and not (state.status == "cancelled" and first not in ("cancelling", "cancelled"))
            self._finish(state, batch, outcomes, again)
        except asyncio.CancelledError:
            raise
        except BatchAPIError as exc:
            self._fail_all(state.custom_ids, self._fatal(f"batch {state.batch_id}", exc))
        except Exception as exc:  # an output file that is not result lines, a full disk, ...
            self._fail_all(state.custom_ids, self._stop(exc))

    async def _poll(self, state: BatchState) -> tuple[dict[str, Any], str]:
        """The ended batch, and the status this run saw first."""
        failures = 0
        first = ""
        assert state.batch_id is not None
        while True:
            try:
                batch = await self.api.retrieve(state.batch_id)
                failures = 0
            except BatchAPIError as exc:
                failures += 1
                if (
                    exc.status is not None and exc.status not in _RETRY_STATUSES
                ) or failures >= _POLL_FAILURES:
                    raise
                await asyncio.sleep(self.hub.options.poll_interval_s)
                continue
            status = str(batch.get("status") or "unknown")
            first = first or status
            counts = {k: int(v) for k, v in (batch.get("request_counts") or {}).items() if isinstance(v, int)}
            if status != state.status or counts != state.counts:
                state.status, state.counts = status, counts
                self._save(state)
            if status in ENDED:
                return batch, first
            await asyncio.sleep(self.hub.options.poll_interval_s)

    def _finish(
        self, state: BatchState, batch: dict[str, Any], outcomes: dict[str, Outcome], again: bool
    ) -> None:
        """Answer the calls of an ended batch. Lines without an answer fail their calls as
        transient, or are parked again for the next round (``again``); a batch cancelled while
        this run waited stops the build (``BatchCancelled``)."""
        status = state.status
        errors = (batch.get("errors") or {}).get("data") or []
        why = f"batch {status}"
        if errors and isinstance(errors[0], dict):
            why += f" ({redact(str(errors[0].get('message') or errors[0].get('code') or ''), limit=120)})"
        missing = Outcome(None, why)
        state.failed = {k: (outcomes.get(k) or missing).reason for k in state.custom_ids
                        if (outcomes.get(k) or missing).body is None}  # fmt: skip
        state.done = True
        self._save(state)
        self._polls.pop(state.name, None)
        kept = len(state.custom_ids) - len(state.failed)
        cancelled = BatchCancelled(
            f"{self.role} batch {state.batch_id} was cancelled: its {kept:,} answers are kept; re-run the "
            f"build to submit the other {len(state.failed):,} again"
        )
        for key in state.custom_ids:
            self._submitted.pop(key, None)
            outcome = outcomes.get(key) or missing
            if outcome.body is None and again:
                if key in self._held:
                    self.pending[key] = self._held.pop(key)
                continue
            if outcome.body is None and status == "cancelled":
                waiter = self._waiters.pop(key, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(cancelled)
                continue
            self._resolve(key, outcome)
        self.hub.check()

    # -- progress --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Counters for progress displays: parked calls, open batches, their lines and states."""
        open_ = [s for s in self.batches.values() if not s.done and s.batch_id is not None]
        states: dict[str, int] = {}
        for state in open_:
            states[state.status] = states.get(state.status, 0) + 1
        return {
            "batch_parked": len(self.pending),
            "batch_open": len(open_),
            "batch_lines": sum(len(s.custom_ids) for s in open_),
            "batch_done": sum(s.counts.get("completed", 0) + s.counts.get("failed", 0) for s in open_),
            "batch_states": ", ".join(f"{n} {status}" for status, n in sorted(states.items())),
        }

    async def close(self) -> None:
        """Stop polling (the batches go on server-side) and close the session."""
        for task in self._polls.values():
            task.cancel()
        await asyncio.gather(*self._polls.values(), return_exceptions=True)
        await self.api.close()


def _slug(role: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in role).strip("-") or "endpoint"


class BatchHub:
    """A build's batch queues (one per endpoint in batch mode) and when a round is submitted.

    A round is submitted when nothing else can move: the flow said it is idle (``idle``) and
    every task on the engine waits on a parked call (``parked >= active``)."""

    def __init__(self, options: BatchOptions):
        self.options = options
        self.queues: dict[str, BatchQueue] = {}
        self.active = 0  # engine tasks not finished (counted from any thread)
        self.parked = 0  # asks waiting on a batch
        self.submitted = 0  # batches submitted by this run
        self._idle = False
        self._submits = 0  # tasks submitted so far: an idle signal older than the last is stale
        self._lock = threading.Lock()
        self._flushing = False
        self._scheduled = False
        self._imported: dict[str, Outcome] | None = None
        self._exported = False

    @property
    def exporting(self) -> bool:
        """Whether parked calls go to a file for an offline engine instead of the Batch API."""
        return self.options.export_to is not None

    def queue(self, role: str, base_url: str, api_key: str, public: str, api_key_env: str) -> BatchQueue:
        """The queue of the endpoint of ``role`` (made on first use)."""
        found = self.queues.get(role)
        if found is None:
            found = self.queues[role] = BatchQueue(self, role, base_url, api_key, public, api_key_env)
        return found

    def imported(self, key: str) -> Outcome | None:
        """The answer ``--batch-import``'s file holds for ``key``, if any: its failed lines answer
        nothing (the call goes on as without the file). The file is read once; ``BatchImportError``
        when it cannot be."""
        if self.options.import_from is None:
            return None
        if self._imported is None:
            path = self.options.import_from
            try:
                found = read_outcomes(path.read_bytes(), str(path))
            except OSError as exc:
                raise BatchImportError(
                    f"cannot read --batch-import file {path}: {exc.strerror or exc}"
                ) from None
            except ValueError as exc:
                raise BatchImportError(f"cannot read --batch-import file: {exc}") from None
            self._imported = {key: outcome for key, outcome in found.items() if outcome.body is not None}
        return self._imported.pop(key, None)

    # -- counting, from the engine -----------------------------------------------------------
    def started(self) -> None:
        """A task was submitted to the engine (any thread)."""
        with self._lock:
            self.active += 1
            self._submits += 1
            self._idle = False

    def finished(self) -> None:
        """A task ended (on the loop)."""
        with self._lock:
            self.active -= 1
        self.check()

    def idle_mark(self) -> int:
        """The mark an idle signal carries (tasks submitted so far; any thread)."""
        with self._lock:
            return self._submits

    def idle(self, mark: int) -> None:
        """The flow cannot move until answers come (on the loop); stale when tasks came since."""
        with self._lock:
            if mark == self._submits:
                self._idle = True
        self.check()

    def park(self) -> None:
        """An ask waits on a batch (on the loop)."""
        self.parked += 1
        self.check()

    def unpark(self) -> None:
        """An ask has its batch answer (on the loop)."""
        self.parked -= 1

    def _stalled(self) -> int:
        """Parked calls not yet submitted when nothing else can move, else 0."""
        if self._flushing or not self._idle or self.parked < self.active:
            return 0
        return sum(len(queue.pending) for queue in self.queues.values())

    def check(self) -> None:
        """Submit a round when nothing else can move (on the loop): once that has held for a
        moment with no call parked meanwhile (the calls of one step park over a few loop turns)."""
        if self._scheduled or not self._stalled():
            return
        self._scheduled = True
        asyncio.get_running_loop().call_later(_SETTLE_S, self._settled, self._stalled())

    def _settled(self, seen: int) -> None:
        self._scheduled = False
        now = self._stalled()
        if not now:
            return
        if now != seen:  # still parking: look again
            self.check()
            return
        self._flushing = True
        asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            if self.exporting:
                self._export()
            else:
                await asyncio.gather(
                    *(q.submit() for q in self.queues.values() if q.pending), return_exceptions=True
                )
        finally:
            self._flushing = False
        self.check()

    def _export(self) -> None:
        path = self.options.export_to
        assert path is not None
        lines = [(queue, queue.take_lines()) for queue in self.queues.values()]
        count = sum(len(taken) for _, taken in lines)
        try:
            _write_atomic(path, b"".join(line for _, taken in lines for _, _, line in taken))
        except OSError as exc:
            error = BatchExported(f"cannot write --batch-export file {path}: {exc.strerror or exc}")
        else:
            error = BatchExported(
                f"{count:,} requests written to {path} for an offline engine (e.g. `vllm run-batch -i "
                f"{path} -o answers.jsonl`); re-run the same build with --batch-import answers.jsonl"
            )
        for queue, taken in lines:
            queue._fail_all((key for key, _, _ in taken), error)

    def snapshot(self, role: str) -> dict[str, Any]:
        """The batch counters of ``role``'s endpoint (none when it does not batch)."""
        queue = self.queues.get(role)
        return {} if queue is None else queue.snapshot()

    async def close(self) -> None:
        """Stop polling and close every queue's session."""
        for queue in self.queues.values():
            await queue.close()


# -- batches of a build folder, for the CLI ------------------------------------------------------


def list_batches(folder: Path, refresh: bool = True) -> list[BatchState]:
    """The batches of the build whose work folder is ``folder`` (``work/batches``); with
    ``refresh`` each open one is looked up on its endpoint (the saved state when that fails)."""
    states = load_states(folder)
    if refresh:
        asyncio.run(_refresh(folder, [s for s in states if not s.done and s.batch_id], cancel=False))
    return states


def cancel_batches(folder: Path) -> list[tuple[BatchState, str]]:
    """Cancel the open batches of the build whose batch folder is ``folder``: (state, what
    happened) for each."""
    states = [s for s in load_states(folder) if not s.done and s.batch_id]
    return asyncio.run(_refresh(folder, states, cancel=True))


async def _refresh(folder: Path, states: list[BatchState], *, cancel: bool) -> list[tuple[BatchState, str]]:
    results = []
    for state in states:
        api = BatchAPI(state.endpoint, os.environ.get(state.api_key_env) or "EMPTY", timeout_s=30.0)
        async with api:
            try:
                assert state.batch_id is not None
                batch = await (api.cancel(state.batch_id) if cancel else api.retrieve(state.batch_id))
            except BatchAPIError as exc:
                results.append((state, f"not reached ({exc})"))
                continue
        state.status = str(batch.get("status") or state.status)
        counts = batch.get("request_counts") or {}
        state.counts = {k: int(v) for k, v in counts.items() if isinstance(v, int)}
        results.append((state, state.status))
    return results
