"""The audit server as a real CLI subprocess: durability under SIGKILL, auth, CSRF, headers, quiet logs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.test_audit_core import add_annotator, build_dataset, cli_env, run_cli


class Server:
    """`bsafe-data audit serve DIR --port 0 ...` in a subprocess; output goes to a log file."""

    def __init__(self, tmp: Path, folder: Path, *args: str, log_name: str = "server.log") -> None:
        self.log = tmp / log_name
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bsafe_data", "audit", "serve", str(folder), "--port", "0", *args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=cli_env(tmp),
            cwd=str(tmp),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = re.search(r"serving (http://127\.0\.0\.1:\d+)/", self.log.read_text())
            if match:
                self.url = match.group(1)
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            time.sleep(0.05)
        self.stop()
        raise AssertionError("server did not announce its URL in 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()


def login(base: str, token: str) -> tuple[requests.Session, str]:
    """A signed-in HTTP client and its CSRF token."""
    s = requests.Session()
    r = s.post(f"{base}/api/login", json={"token": token}, timeout=10)
    assert r.status_code == 200, r.text
    return s, r.json()["csrf"]


def answers_for(item: dict, pick: int) -> dict[str, str]:
    return {q["key"]: ("yes", "no", "unsure")[(pick + n) % 3] for n, q in enumerate(item["questions"])}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit_server")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    folder = build_dataset(workdir)
    run_cli(workdir, "audit", "sample", str(folder), "--n", "200", "--overlap", "0.3", "--seed", "1")
    return folder


@pytest.fixture(scope="module")
def tokens(workdir, dataset) -> dict[str, str]:
    return {name: add_annotator(workdir, dataset, name) for name in ("ann_a", "ann_b", "ann_c")}


def test_sigkill_loses_no_acknowledged_judgement(workdir, dataset, tokens):
    """Two annotators hammer the server; SIGKILL it mid-flight; every acknowledged judgement is stored."""
    server = Server(workdir, dataset, "--access-log", log_name="kill.log")
    acked: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def annotate(name: str) -> None:
        try:
            s, csrf = login(server.url, tokens[name])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{name} login: {exc!r}")
            return
        deadline = time.monotonic() + 30
        for n in range(2000):  # bounded in count and time
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                item = s.get(f"{server.url}/api/next", timeout=5).json()["item"]
                if item is None:
                    return
                body = {
                    "item_id": item["item_id"],
                    "answers": answers_for(item, n),
                    "note": f"secret-note-{name}-{n}",
                    "skipped": False,
                    "submission_id": uuid.uuid4().hex,
                }
                r = s.post(
                    f"{server.url}/api/judgements", json=body, headers={"X-CSRF-Token": csrf}, timeout=5
                )
            except requests.RequestException:
                return  # the server is gone
            if r.status_code == 200 and r.json().get("ok"):
                with lock:
                    acked.append({**body, "annotator": name, "judgement_id": r.json()["judgement_id"]})
            elif r.status_code != 200:
                errors.append(f"{name}: HTTP {r.status_code} {r.text[:200]}")
                return

    threads = [threading.Thread(target=annotate, args=(name,)) for name in ("ann_a", "ann_b")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            if len(acked) >= 40 and len({a["annotator"] for a in acked}) == 2:
                break
        time.sleep(0.02)
    os.kill(server.proc.pid, signal.SIGKILL)  # mid-flight: both clients are still posting
    server.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    server.stop()
    assert not errors, errors
    assert len(acked) >= 40, f"only {len(acked)} acknowledged before the kill"
    assert server.proc.returncode == -signal.SIGKILL

    # restart via the real CLI: the store opens, serves, and holds every acknowledged judgement
    again = Server(workdir, dataset, log_name="restart.log")
    try:
        s, _ = login(again.url, tokens["ann_a"])
        assert s.get(f"{again.url}/api/next", timeout=10).status_code == 200
        summary = s.get(f"{again.url}/api/summary", timeout=10).json()
    finally:
        again.stop()
    db = dataset / ".bsafe" / "audit.sqlite"
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r["submission_id"]: dict(r) for r in conn.execute("SELECT * FROM judgements")}
    conn.close()
    manifest = hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()
    for a in acked:
        row = stored.get(f"{a['annotator']}:{a['submission_id']}")
        assert row is not None, f"acknowledged judgement {a['judgement_id']} lost"
        assert row["judgement_id"] == a["judgement_id"]
        assert row["annotator"] == a["annotator"] and row["item_id"] == a["item_id"]
        assert json.loads(row["answers"]) == a["answers"] and row["note"] == a["note"]
        assert row["manifest_sha256"] == manifest and row["created_at"]
    assert summary["judgements"] >= len(acked)
    # nothing from the rows or tokens in the server's output; the access log has paths only
    log = server.log.read_text() + again.log.read_text()
    assert "POST /api/judgements 200" in log
    from bsafe_data.audit.store import AuditStore

    for item in AuditStore(db).items(with_rows=True):
        for seg in item["row"]["segments"]:
            if len(seg["text"].strip()) > 12:
                assert seg["text"].strip() not in log
    for token in tokens.values():
        assert token not in log
    assert "secret-note" not in log


def test_auth_csrf_and_headers(workdir, dataset, tokens):
    server = Server(workdir, dataset, log_name="auth.log")
    try:
        base = server.url
        # reads of the set's summary are open on localhost; anything tied to an annotator is not
        assert requests.get(f"{base}/api/summary", timeout=5).status_code == 200
        assert requests.get(f"{base}/api/next", timeout=5).status_code == 401
        assert requests.get(f"{base}/api/session", timeout=5).status_code == 401
        write = {"item_id": 1, "answers": {}, "skipped": True, "submission_id": uuid.uuid4().hex}
        assert requests.post(f"{base}/api/judgements", json=write, timeout=5).status_code == 401
        assert requests.post(f"{base}/api/login", json={"token": "bsa_wrong"}, timeout=5).status_code == 401
        s, csrf = login(base, tokens["ann_c"])
        assert s.post(f"{base}/api/judgements", json=write, timeout=5).status_code == 403
        bad = s.post(f"{base}/api/judgements", json=write, headers={"X-CSRF-Token": "nope"}, timeout=5)
        assert bad.status_code == 403
        ok = s.post(f"{base}/api/judgements", json=write, headers={"X-CSRF-Token": csrf}, timeout=5)
        assert ok.status_code == 200 and ok.json()["ok"]
        repeat = s.post(f"{base}/api/judgements", json=write, headers={"X-CSRF-Token": csrf}, timeout=5)
        assert repeat.json()["duplicate"] is True  # a retried POST is not counted twice
        assert s.post(f"{base}/api/undo", json={}, timeout=5).status_code == 403
        assert (
            s.post(f"{base}/api/undo", json={}, headers={"X-CSRF-Token": csrf}, timeout=5).status_code == 200
        )
        # form posts (what a cross-site page can send without CORS) are refused
        form = s.post(f"{base}/api/judgements", data="x=1", headers={"X-CSRF-Token": csrf}, timeout=5)
        assert form.status_code == 415
        cross = s.post(
            f"{base}/api/judgements",
            json=write,
            headers={"X-CSRF-Token": csrf, "Origin": "http://evil.test"},
            timeout=5,
        )
        assert cross.status_code == 403
        # DNS rebinding: a loopback server answers only to loopback host names
        assert requests.get(f"{base}/", headers={"Host": "evil.test"}, timeout=5).status_code == 421
        page = requests.get(f"{base}/", timeout=5)
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert requests.get(f"{base}/static/app.js", timeout=5).status_code == 200
        assert requests.get(f"{base}/static/../store.py", timeout=5).status_code == 404
        cookie = s.post(f"{base}/api/login", json={"token": tokens["ann_c"]}, timeout=5).headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # JSON never carries a raw "<": row text cannot close a tag even if mis-rendered
        item = s.get(f"{base}/api/next", timeout=5)
        assert "<" not in item.text
    finally:
        server.stop()

    strict = Server(workdir, dataset, "--require-token", log_name="strict.log")
    try:
        assert requests.get(f"{strict.url}/api/summary", timeout=5).status_code == 401
        assert requests.get(f"{strict.url}/", timeout=5).status_code == 200  # the sign-in page itself
        s, _ = login(strict.url, tokens["ann_c"])
        assert s.get(f"{strict.url}/api/summary", timeout=5).status_code == 200
    finally:
        strict.stop()


def test_beyond_localhost_needs_tokens_for_reads():
    from bsafe_data.audit.auth import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("192.0.2.1")


def test_serve_without_audit_set_fails_readably(workdir, dataset):
    empty = workdir / "empty"
    empty.mkdir()
    proc = run_cli(workdir, "audit", "serve", str(empty), "--port", "0", check=False, timeout=60)
    assert proc.returncode == 2 and "manifest.json is missing" in proc.stderr  # not a dataset folder
    unsampled = workdir / "unsampled"
    shutil.copytree(dataset, unsampled, ignore=shutil.ignore_patterns(".bsafe"))
    proc = run_cli(workdir, "audit", "serve", str(unsampled), "--port", "0", check=False, timeout=60)
    assert proc.returncode == 2 and "audit sample" in proc.stderr


# -- hostile clients -------------------------------------------------------------------------


def _read_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    """Everything the server sends until it closes the connection (AssertionError after limit_s)."""
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"connection still open after {limit_s} s; got {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return data


def _judgement(item: dict, pick: int) -> dict:
    """A complete judgement of ``item`` as the app posts it."""
    return {"item_id": item["item_id"], "answers": answers_for(item, pick), "submission_id": uuid.uuid4().hex}


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _await_threads(pid: int, ok, limit_s: float = 15) -> int:  # noqa: ANN001 - a predicate
    """The server's thread count once ``ok(count)`` holds (or after ``limit_s``)."""
    deadline = time.monotonic() + limit_s
    while not ok(_threads(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _threads(pid)


def test_stalled_and_dripping_bodies_are_closed_within_the_read_timeout(workdir, dataset, tokens):
    server = Server(workdir, dataset, "--read-timeout", "1", log_name="stall.log")
    host, port = server.url.removeprefix("http://").split(":")
    try:
        idle_threads = _threads(server.proc.pid)
        head = (
            f"POST /api/judgements HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        ).encode()
        stalled = []
        for _ in range(20):  # headers and the start of a body, then nothing
            sock = socket.create_connection((host, int(port)))
            sock.sendall(head + b'{"item_id": 1, "note": "')
            stalled.append(sock)
        idle = socket.create_connection((host, int(port)))  # connects, never sends a byte
        drip = socket.create_connection((host, int(port)))
        drip.sendall(head)
        dripping = threading.Event()

        def keep_dripping() -> None:  # a byte every 0.1 s: never idle, never done
            try:
                while not dripping.is_set():
                    drip.sendall(b" ")
                    time.sleep(0.1)
            except OSError:
                return

        dripper = threading.Thread(target=keep_dripping)
        dripper.start()
        held = _await_threads(server.proc.pid, lambda n: n >= idle_threads + 20)
        assert held >= idle_threads + 20  # each stalled body holds a thread now
        # the server still answers others while 22 connections hang
        assert requests.get(f"{server.url}/healthz", timeout=5).json() == {"ok": True}
        s, csrf = login(server.url, tokens["ann_a"])
        item = s.get(f"{server.url}/api/next", timeout=5).json()["item"]
        body = _judgement(item, 1)
        ok = s.post(f"{server.url}/api/judgements", json=body, headers={"X-CSRF-Token": csrf}, timeout=5)
        assert ok.status_code == 200 and ok.json()["ok"]
        for sock in stalled:  # answered 408 and closed, each within the timeout (generous slack)
            answer = _read_until_closed(sock, 15)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b'"request body not received within 1 s"' in answer
            sock.close()
        answer = _read_until_closed(drip, 15)  # dripping does not extend the deadline
        dripping.set()
        dripper.join(10)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert _read_until_closed(idle, 15) == b""  # an idle connection is closed without an answer
        left = _await_threads(server.proc.pid, lambda n: n <= idle_threads + 2)
        assert left <= idle_threads + 2  # every held thread was let go
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()


def test_hostile_requests_get_a_4xx_with_a_message(workdir, dataset, tokens):
    server = Server(workdir, dataset, "--access-log", log_name="hostile.log")
    host, port = server.url.removeprefix("http://").split(":")
    try:
        s, csrf = login(server.url, tokens["ann_b"])
        item = s.get(f"{server.url}/api/next", timeout=5).json()["item"]
        good = _judgement(item, 0)

        def post(raw: bytes, path: str = "/api/judgements", **headers: str) -> requests.Response:
            sent = {"X-CSRF-Token": csrf, "Content-Type": "application/json", **headers}
            return s.post(f"{server.url}{path}", data=raw, headers=sent, timeout=10)

        def with_(**changes: object) -> bytes:
            return json.dumps({**good, "submission_id": uuid.uuid4().hex, **changes}).encode()

        cases = {
            "deep nesting": (b'{"item_id": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400, "nested too deeply"),
            "2**70 item id": (with_(item_id=2**70), 404, "no such item"),
            "negative item id": (with_(item_id=-3), 404, "no such item"),
            "lone surrogate in a note": (with_(note="x").replace(b'"x"', b'"\\ud800"'), 400, "valid Unicode"),
            "item id as text": (with_(item_id=str(item["item_id"])), 400, "item_id must be an integer"),
            "item id as float": (with_(item_id=1.0), 400, "item_id must be an integer"),
            "skipped as text": (with_(skipped="no"), 400, "skipped must be true or false"),
            "answers as list": (with_(answers=["yes"]), 400, "answers must be an object"),
            "note as number": (with_(note=5), 400, "note must be valid Unicode text"),
            "answer of the wrong type": (
                with_(answers={**good["answers"], item["questions"][0]["key"]: 5}),
                400,
                "must be one of yes, no, unsure",
            ),
            "unknown question": (with_(answers={"nope": "yes"}), 400, "unknown questions"),
            "surrogate in a question name": (
                with_(answers={"x": "yes"}).replace(b'"x"', b'"\\udc80"'),
                400,
                "unknown questions",
            ),
            "huge integer literal": (
                with_(item_id=1).replace(b'"item_id": 1', b'"item_id": ' + b"9" * 5000),
                400,
                "not JSON",
            ),
            "not JSON": (b"{nope", 400, "not JSON"),
            "a JSON list": (b"[1, 2]", 400, "must be a JSON object"),
            "oversized body": (b'{"note": "' + b"x" * (70 * 1024) + b'"}', 413, "too large"),
        }
        for name, (raw, status, message) in cases.items():
            r = post(raw)
            assert r.status_code == status, (name, r.status_code, r.text[:200])
            assert message in r.json()["error"], (name, r.json())
        surrogate_login = s.post(
            f"{server.url}/api/login", data=b'{"token": "bsa_\\ud800"}', timeout=10,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert surrogate_login.status_code == 401 and surrogate_login.json()["error"] == "unknown token"
        assert s.post(f"{server.url}/api/login", json={"token": 5}, timeout=10).status_code == 401
        latin = post(with_(), **{"X-CSRF-Token": "caf\u00e9"})
        assert latin.status_code == 403 and "CSRF" in latin.json()["error"]

        def raw_request(request: bytes) -> bytes:
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(request)
                return _read_until_closed(sock, 15)

        chunked = raw_request(
            f"POST /api/judgements HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\n{}{}{\r\n0\r\n\r\n".encode()
        )
        assert chunked.startswith(b"HTTP/1.1 411 ") and b"Content-Length" in chunked
        bad_length = raw_request(
            f"POST /api/login HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 1e3\r\n\r\n".encode()
        )
        assert bad_length.startswith(b"HTTP/1.1 400 ") and b"bad Content-Length" in bad_length
        brew = raw_request(f"BREW /coffee HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        assert brew.startswith(b"HTTP/1.1 405 ") and b'{"error": "method not allowed"}' in brew
        garbage = raw_request(b"\x16\x03\x01 hello there\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ") and b'"error"' in garbage
        escape = raw_request(
            b"GET /\x1b[31mred HTTP/1.1\r\nHost: "
            + f"{host}:{port}".encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        assert escape.startswith(b"HTTP/1.1 ")
        # and the good judgement still goes in
        ok = post(with_())
        assert ok.status_code == 200 and ok.json()["ok"]
    finally:
        server.stop()
    log = server.log.read_text()
    assert "internal error" not in log and "Traceback" not in log
    assert "BREW /coffee 405" in log and "\x1b" not in log  # the access log prints no terminal escapes
