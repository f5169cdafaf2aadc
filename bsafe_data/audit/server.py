"""The annotation web app: standard-library HTTP server, JSON API, assets served from the package.

Security model (harmful text is data): every asset comes from ``bsafe_data/audit/static`` (no
CDN, works offline); the page renders row text with ``textContent`` only and the
Content-Security-Policy forbids inline script; JSON escapes ``<``, ``>`` and ``&``; writes need a
session and its CSRF token; reads need a session too once the server listens beyond localhost
(or with ``require_token``); on a loopback bind the Host header must name a loopback host (no DNS
rebinding). Nothing from request bodies or rows is logged; the optional access log has method,
path (no query string) and status only.

Hostile clients get a 4xx with a JSON message, never a 500 or a stuck thread: a request (its line,
headers and body) must arrive within ``read_timeout_s`` of its first byte and an idle kept-alive
connection is closed after as long (a stalled or dripping body is answered 408 and closed); bodies
are at most ``MAX_BODY`` bytes with a Content-Length (no chunked bodies); JSON nested too deeply,
ids beyond SQLite's integers, text that is not valid Unicode (lone surrogates) and values of the
wrong type are refused with what was wrong.
"""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bsafe_data.audit.auth import (
    CSRF_HEADER,
    SESSION_COOKIE,
    SESSION_TTL_S,
    Authenticator,
    csrf_ok,
    is_loopback,
)
from bsafe_data.audit.folder import classifier_thresholds, manifest_sha256
from bsafe_data.audit.questions import QUESTIONS, validate_answers
from bsafe_data.audit.store import AuditStore, StoreError, is_text

MAX_BODY = 64 * 1024
MAX_NOTE = 4000
#: Seconds a request may take to arrive once it started (and a kept-alive connection may idle).
READ_TIMEOUT_S = 30.0
MAX_ITEM_ID = 2**63 - 1  # SQLite's integers
NEAR_THRESHOLD = 0.15
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,100}$")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")  # what the access log may print as is

STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "index.html": "text/html; charset=utf-8",
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class HTTPError(Exception):
    """An error answer: status and a short message (never row text)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _reason_texts() -> dict[str, str]:
    try:
        from bsafe_data.rows import REASONS
    except ImportError:  # pragma: no cover - rows.py always ships
        return {}
    return dict(REASONS)


def item_view(item: dict[str, Any], thresholds: dict[str, float], reasons: dict[str, str]) -> dict[str, Any]:
    """What the screen shows of one audit item (plain data; the page renders it as text)."""
    row = item["row"]
    inj = row.get("injection") or {}
    segments = [{"kind": s["kind"], "text": s["text"]} for s in row.get("segments") or []]
    missing = not segments
    if missing and row.get("response"):
        segments = [{"kind": "continuation", "text": row["response"]}]
    deleted = "".join(s["text"] for s in segments if s["kind"] in ("steering", "violation"))
    scores = []
    for s in row.get("scores") or []:
        thr = thresholds.get(s.get("classifier"))
        score = s.get("score")
        scores.append(
            {
                "classifier": s.get("classifier"),
                "target": s.get("target"),
                "label": s.get("label"),
                "score": None if score is None else round(float(score), 4),
                "threshold": thr,
                "near": thr is not None and score is not None and abs(float(score) - thr) <= NEAR_THRESHOLD,
                "categories": list(s.get("categories") or []),
            }
        )
    return {
        "item_id": item["item_id"],
        "row_id": item["row_id"],
        "config": item["config"],
        "split": item["split"],
        "kind": item["kind"],
        "group": item["grp"],
        "category": inj.get("category"),
        "relative_position": inj.get("relative_position"),
        "fifth": item.get("fifth"),
        "borderline": item["borderline"],
        "replicas": item["replicas"],
        "context": [{"role": t["role"], "content": t["content"]} for t in row.get("context") or []],
        "segments": segments,
        "segments_missing": missing,
        "control": "".join(s["text"] for s in segments if s["kind"] == "control"),
        "backtrack": [
            {"tokenizer": b["tokenizer"], "tokens": b["tokens"], "deleted": deleted}
            for b in row.get("backtrack") or []
        ],
        "scores": scores,
        "reasons": [{"code": r, "text": reasons.get(r, "")} for r in row.get("reasons") or []],
        "questions": [{"key": k, "text": t} for k, t in QUESTIONS[item["grp"]]],
    }


def _json_bytes(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False)
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate echoed from a request: ASCII escapes instead
        raw = json.dumps(obj).encode()
        text = raw.decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


class _DeadlineReader(io.RawIOBase):
    """The connection's socket as a raw stream whose reads end at a deadline.

    Waiting for a request's first byte may take ``timeout_s`` (an idle kept-alive connection);
    from that byte on, the whole request (line, headers, body) must arrive within ``timeout_s``,
    however slowly it drips. A read past the deadline raises ``TimeoutError``.
    """

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        super().__init__()
        self.sock = sock
        self.timeout_s = timeout_s
        self.deadline: float | None = None

    def readable(self) -> bool:
        """A readable stream."""
        return True

    def next_request(self) -> None:
        """The next request's clock starts at its first byte."""
        self.deadline = None

    def readinto(self, buffer: Any) -> int:
        """Read what the socket has, waiting at most until the deadline."""
        wait = self.timeout_s if self.deadline is None else self.deadline - time.monotonic()
        if wait <= 0:
            raise TimeoutError("request not received in time")
        self.sock.settimeout(wait)
        count = self.sock.recv_into(buffer)
        if count and self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
        return count


class AuditApp:
    """Request handling state shared by all server threads."""

    def __init__(
        self,
        folder: str | Path,
        store: AuditStore,
        *,
        host: str,
        blur: bool = True,
        require_token: bool = False,
        access_log: bool = False,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self.folder = Path(folder)
        self.read_timeout_s = read_timeout_s
        self.store = store
        self.auth = Authenticator(store)
        self.loopback = is_loopback(host)
        self.reads_need_auth = require_token or not self.loopback
        self.blur = blur
        self.access_log = access_log
        meta = store.meta()
        self.sample_manifest = meta.get("manifest_sha256", "")
        self.thresholds = (meta.get("sample") or {}).get("thresholds") or classifier_thresholds(folder)
        self.reasons = _reason_texts()

    def manifest(self) -> str:
        """The dataset's manifest hash now (a refilter between judgements changes it)."""
        try:
            return manifest_sha256(self.folder)
        except FileNotFoundError:
            return self.sample_manifest

    def view(self, item_id: int | None) -> dict[str, Any] | None:
        """The screen data of an item, or None."""
        if item_id is None:
            return None
        item = self.store.item(item_id)
        return item_view(item, self.thresholds, self.reasons) if item else None


def make_handler(app: AuditApp) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``app``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "bsafe-audit"
        sys_version = ""
        protocol_version = "HTTP/1.1"

        # -- plumbing --------------------------------------------------------------------------

        def setup(self) -> None:
            """The stdlib's set-up, with reads that end at the request's deadline."""
            super().setup()
            self.rfile.close()  # the socket file made by the stdlib: replaced, not leaked
            self._reader = _DeadlineReader(self.connection, app.read_timeout_s)
            self.rfile = io.BufferedReader(self._reader)

        def handle_one_request(self) -> None:
            """One request: its clock starts at its first byte."""
            self._reader.next_request()
            super().handle_one_request()

        def _request_in(self) -> None:
            """The request has arrived: the answer gets the full timeout to be written."""
            self.connection.settimeout(app.read_timeout_s)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The stdlib's protocol errors (bad request line, too many headers...) as JSON 4xx."""
            if code == 501:  # an unknown method: the client's mistake
                code, message = 405, "method not allowed"
            if self.request_version == "HTTP/0.9":  # an unparsable request line: answer in HTTP/1.1
                self.request_version = self.protocol_version
            self.close_connection = True
            try:
                self._request_in()
                self._json(code, {"error": message or "bad request"}, {"Connection": "close"})
            except OSError:
                pass

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            """Silenced: the stdlib would log request lines; see ``log_request``."""

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            """Optional access log: method, path without query, status. Never bodies or row text."""
            if app.access_log:  # a garbage request line may leave no method or path
                raw = getattr(self, "path", None)
                path = urlsplit(raw).path if isinstance(raw, str) else "-"
                line = f"{getattr(self, 'command', None) or '-'} {path[:200]}"
                sys.stderr.write(f"{_PRINTABLE.sub('?', line)} {code}\n")  # no terminal escapes

        def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None):
            self.send_response(status)
            for key, value in SECURITY_HEADERS.items():
                self.send_header(key, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, _json_bytes(obj), "application/json; charset=utf-8", headers)

        def _read_raw(self) -> None:
            """Read the whole request body first, so an early error answer leaves the connection clean."""
            self._raw = b""
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise HTTPError(411, "send the body with a Content-Length (no Transfer-Encoding)")
            try:
                length = int(self.headers.get("Content-Length") or "0")
            except ValueError:
                self.close_connection = True
                raise HTTPError(400, "bad Content-Length") from None
            if length < 0 or length > MAX_BODY:
                self.close_connection = True
                raise HTTPError(413, f"request body too large (at most {MAX_BODY} bytes)")
            if not length:
                return
            try:
                self._raw = self.rfile.read(length)
            except TimeoutError:  # stalled or dripping: the thread is not held any longer
                self.close_connection = True
                raise HTTPError(408, f"request body not received within {app.read_timeout_s:g} s") from None
            if len(self._raw) < length:
                self.close_connection = True
                raise HTTPError(400, "request body ended before its Content-Length")

        def _body(self) -> dict[str, Any]:
            if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                raise HTTPError(415, "writes take Content-Type: application/json")
            try:
                body = json.loads(self._raw or b"{}")
            except RecursionError:
                raise HTTPError(400, "request body is nested too deeply") from None
            except ValueError:
                raise HTTPError(400, "request body is not JSON") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "request body must be a JSON object")
            return body

        def _cookie_session_id(self) -> str | None:
            raw = self.headers.get("Cookie")
            if not raw:
                return None
            try:
                jar = SimpleCookie(raw)
            except CookieError:
                return None
            morsel = jar.get(SESSION_COOKIE)
            return morsel.value if morsel else None

        def _session(self) -> dict[str, str] | None:
            return app.auth.session(self._cookie_session_id())

        def _need_session(self) -> dict[str, str]:
            session = self._session()
            if session is None:
                raise HTTPError(401, "sign in with your annotator token")
            return session

        def _need_write(self) -> dict[str, str]:
            session = self._need_session()
            if not csrf_ok(session, self.headers.get(CSRF_HEADER)):
                raise HTTPError(403, "missing or wrong CSRF token")
            return session

        def _host_ok(self) -> bool:
            if not app.loopback:
                return True
            host = (self.headers.get("Host") or "").strip()
            if host.startswith("["):
                name = host[1 : host.find("]")] if "]" in host else host
            else:
                name = host.rsplit(":", 1)[0] if ":" in host else host
            return is_loopback(name) or name == "localhost"

        def _origin_ok(self) -> bool:
            origin = self.headers.get("Origin")
            if origin is None:
                return True
            return urlsplit(origin).netloc == (self.headers.get("Host") or "")

        # -- dispatch --------------------------------------------------------------------------

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            self._dispatch("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._json(405, {"error": "method not allowed"})

        do_DELETE = do_PATCH = do_PUT  # noqa: N815

        def _dispatch(self, method: str) -> None:
            try:
                try:
                    if method == "POST":
                        self._read_raw()
                finally:
                    self._request_in()
                if not self._host_ok():
                    raise HTTPError(421, "unexpected Host header")
                path = urlsplit(self.path).path
                if method == "POST" and not self._origin_ok():
                    raise HTTPError(403, "cross-origin write refused")
                route = _ROUTES.get((method, path))
                if route is None and method == "GET" and path.startswith("/static/"):
                    self._static(path[len("/static/") :])
                    return
                if route is None:
                    raise HTTPError(404 if method in ("GET", "POST") else 405, "not found")
                route(self)
            except HTTPError as exc:
                self._json(exc.status, {"error": exc.message})
            except StoreError as exc:
                self._json(409, {"error": str(exc)})
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:  # never echo row text: type name only
                sys.stderr.write(f"bsafe-audit: internal error {type(exc).__name__}\n")
                try:
                    self._json(500, {"error": "internal error"})
                except OSError:
                    pass

        # -- routes ----------------------------------------------------------------------------

        def _static(self, name: str) -> None:
            if name not in STATIC_FILES:
                raise HTTPError(404, "not found")
            body = resources.files("bsafe_data.audit").joinpath("static", name).read_bytes()
            self._send(200, body, STATIC_FILES[name])

        def r_index(self) -> None:
            self._static("index.html")

        def r_health(self) -> None:
            self._json(200, {"ok": True})

        def r_login(self) -> None:
            body = self._body()
            token = body.get("token")
            annotator = app.auth.verify_token(token) if isinstance(token, str) else None
            if annotator is None:
                time.sleep(0.25)
                raise HTTPError(401, "unknown token")
            session_id, csrf = app.auth.open_session(annotator)
            cookie = (
                f"{SESSION_COOKIE}={session_id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_TTL_S}"
            )
            self._json(200, {"annotator": annotator, "csrf": csrf}, {"Set-Cookie": cookie})

        def r_logout(self) -> None:
            self._need_write()
            session_id = self._cookie_session_id()
            if session_id:
                app.auth.close_session(session_id)
            cookie = f"{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
            self._json(200, {"ok": True}, {"Set-Cookie": cookie})

        def r_session(self) -> None:
            session = self._need_session()
            self._json(
                200,
                {
                    "annotator": session["annotator"],
                    "csrf": session["csrf"],
                    "blur": app.blur,
                    "reads_need_token": app.reads_need_auth,
                },
            )

        def r_summary(self) -> None:
            if app.reads_need_auth:
                self._need_session()
            items = app.store.items()
            judgements = app.store.judgements()
            self._json(
                200,
                {
                    "items": len(items),
                    "judgements": sum(not j["skipped"] for j in judgements),
                    "skipped": sum(j["skipped"] for j in judgements),
                    "annotators": len({j["annotator"] for j in judgements}),
                },
            )

        def r_next(self) -> None:
            session = self._need_session()
            annotator = session["annotator"]
            item_id = app.store.claim_next(annotator)
            self._json(200, {"item": app.view(item_id), "progress": app.store.progress(annotator)})

        def r_judge(self) -> None:
            session = self._need_write()
            annotator = session["annotator"]
            body = self._body()
            item_id, submission_id = body.get("item_id"), body.get("submission_id")
            if not isinstance(item_id, int) or isinstance(item_id, bool):
                raise HTTPError(400, "item_id must be an integer")
            if not isinstance(submission_id, str) or not _SUBMISSION_ID.match(submission_id):
                raise HTTPError(400, "submission_id must be 8-100 characters [A-Za-z0-9_-]")
            skipped = body.get("skipped", False)
            if not isinstance(skipped, bool):
                raise HTTPError(400, "skipped must be true or false")
            note = body.get("note")
            note = "" if note is None else note
            if not is_text(note) or len(note) > MAX_NOTE:
                raise HTTPError(400, f"note must be valid Unicode text of at most {MAX_NOTE} characters")
            answers = body.get("answers")
            answers = {} if answers is None else answers
            if not isinstance(answers, dict):
                raise HTTPError(400, "answers must be an object")
            item = app.store.item(item_id) if 0 < item_id <= MAX_ITEM_ID else None
            if item is None:
                raise HTTPError(404, "no such item")
            try:
                clean = {} if skipped else validate_answers(item["grp"], answers)
            except ValueError as exc:
                raise HTTPError(400, str(exc)) from None
            judgement_id, created = app.store.record_judgement(
                item_id=item_id,
                annotator=annotator,
                answers=clean,
                note=note,
                skipped=skipped,
                submission_id=f"{annotator}:{submission_id}",
                manifest_sha256=app.manifest(),
            )
            # committed: only now is the judgement acknowledged
            self._json(
                200,
                {
                    "ok": True,
                    "judgement_id": judgement_id,
                    "duplicate": not created,
                    "progress": app.store.progress(annotator),
                },
            )

        def r_undo(self) -> None:
            session = self._need_write()
            annotator = session["annotator"]
            self._body()
            undone = app.store.undo_last(annotator)
            if undone is None:
                raise HTTPError(409, "nothing to undo")
            self._json(
                200,
                {
                    "ok": True,
                    "item": app.view(undone["item_id"]),
                    "previous": {"answers": undone["answers"], "note": undone["note"]},
                    "progress": app.store.progress(annotator),
                },
            )

    _ROUTES: dict[tuple[str, str], Callable[[Handler], None]] = {
        ("GET", "/"): Handler.r_index,
        ("GET", "/index.html"): Handler.r_index,
        ("GET", "/healthz"): Handler.r_health,
        ("POST", "/api/login"): Handler.r_login,
        ("POST", "/api/logout"): Handler.r_logout,
        ("GET", "/api/session"): Handler.r_session,
        ("GET", "/api/summary"): Handler.r_summary,
        ("GET", "/api/next"): Handler.r_next,
        ("POST", "/api/judgements"): Handler.r_judge,
        ("POST", "/api/undo"): Handler.r_undo,
    }
    return Handler


class AuditServer(ThreadingHTTPServer):
    """Threaded HTTP server; request threads are daemons so a stop never waits on a slow client."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def make_server(
    folder: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    db: str | Path | None = None,
    blur: bool = True,
    require_token: bool = False,
    access_log: bool = False,
    read_timeout_s: float = READ_TIMEOUT_S,
) -> AuditServer:
    """Bind the app (``port`` 0 picks a free port); call ``serve_forever`` on the result."""
    store = AuditStore.for_folder(folder, db)
    app = AuditApp(
        folder,
        store,
        host=host,
        blur=blur,
        require_token=require_token,
        access_log=access_log,
        read_timeout_s=read_timeout_s,
    )
    server = AuditServer((host, port), make_handler(app))
    server.app = app  # type: ignore[attr-defined]
    return server


def serve(folder: str | Path, *, announce: Callable[[str], None] = print, **options: Any) -> None:
    """Run the app until SIGINT/SIGTERM; announces the URL (and a warning on a non-loopback bind).

    ``options`` are ``make_server``'s (host, port, db, blur, require_token, access_log, read_timeout_s).
    """
    server = make_server(folder, **options)
    app: AuditApp = server.app  # type: ignore[attr-defined]
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    if not app.loopback:
        announce(
            f"warning: listening beyond localhost on {bound_host}; every page and API call needs a token"
        )
    if not app.store.annotator_names():
        announce("warning: no annotators yet: `bsafe-data audit annotators add DIR NAME` prints a token")
    announce(f"bsafe-data audit: serving http://{shown}:{bound_port}/")
    sys.stdout.flush()

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
