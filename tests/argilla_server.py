"""A small Argilla 2.x API server for tests (127.0.0.1, random port, in-process thread).

It speaks enough of the v1 API for the real ``argilla`` SDK to sign in and run
``rg.Dataset.from_disk``: the current user and workspace, dataset create / get / update / publish,
fields, questions, metadata properties and vector settings, the records bulk upsert and list (so
``Dataset.to_disk`` and ``records.to_list`` export what ``annotate`` put there)::

    with ArgillaServer() as server:
        client = rg.Argilla(api_url=server.url, api_key="argilla.apikey")
        rg.Dataset.from_disk(folder, client=client)
        server.datasets        # name -> the dataset as the SDK created it (with its settings and records)
        server.annotate(name, "injected:row-1", user_id, {"violation_real": "yes"}, "draft")
        server.unknown         # requests for routes this server does not know (should stay empty)

Storage is in memory. Posted objects are stored as sent, with an ``id``, timestamps and the
dataset id added, and answered back the way Argilla answers them. Every API key is accepted.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_PROPERTY = re.compile(
    r"^/api/v1/(?:me/)?datasets/([0-9a-f-]{36})/(fields|questions|metadata-properties|vectors-settings)$"
)
_DATASET = re.compile(r"^/api/v1/datasets/([0-9a-f-]{36})(/publish|/records|/records/bulk)?$")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class ArgillaServer:
    """The server and what it holds (see the module docstring)."""

    def __init__(self) -> None:
        self.user = {"id": str(uuid.uuid4()), "username": "owner", "role": "owner", "inserted_at": _now(),
                     "updated_at": _now()}  # fmt: skip
        self.workspace = {
            "id": str(uuid.uuid4()),
            "name": "argilla",
            "inserted_at": _now(),
            "updated_at": _now(),
        }
        self.by_id: dict[str, dict[str, Any]] = {}
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def datasets(self) -> dict[str, dict[str, Any]]:
        """Datasets by name, each with ``fields``, ``questions``, ``metadata-properties``,
        ``vectors-settings`` and ``records`` as the SDK sent them."""
        return {d["name"]: d for d in self.by_id.values()}

    def __enter__(self) -> ArgillaServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- routes ----------------------------------------------------------------------------------

    def annotate(self, dataset: str, record: str, user_id: str, values: dict[str, Any], status: str) -> None:
        """What an annotator does in the UI: ``values`` (question -> answer) for the record whose
        external id is ``record``, saved as ``submitted``, ``draft`` or ``discarded``. The record
        is ``completed`` once it has the dataset's ``min_submitted`` submitted responses."""
        with self.lock:
            found = next(r for r in self.datasets[dataset]["records"] if r["external_id"] == record)
            found.setdefault("responses", []).append(
                {"values": {q: {"value": v} for q, v in values.items()}, "status": status, "user_id": user_id}
            )
            needed = (self.datasets[dataset].get("distribution") or {}).get("min_submitted", 1)
            submitted = sum(r["status"] == "submitted" for r in found["responses"])
            found["status"] = "completed" if submitted >= needed else "pending"

    def route(self, method: str, path: str, body: Any, query: dict[str, list[str]]) -> tuple[int, Any]:
        """The status and JSON answer of one request."""
        if (method, path) == ("GET", "/api/v1/me"):
            return 200, self.user
        if (method, path) == ("GET", "/api/v1/me/workspaces"):
            return 200, {"items": [self.workspace]}
        if (method, path) == ("GET", f"/api/v1/workspaces/{self.workspace['id']}"):
            return 200, self.workspace
        if (method, path) == ("GET", "/api/v1/me/datasets"):
            return 200, {"items": [self._public(d) for d in self.by_id.values()]}
        if (method, path) == ("POST", "/api/v1/datasets"):
            if any(d["name"] == body["name"] for d in self.by_id.values()):
                return 409, {"detail": "a dataset of that name exists"}
            dataset = {**body, "id": str(uuid.uuid4()), "status": "draft", "inserted_at": _now(),
                       "updated_at": _now(), "last_activity_at": _now(), "fields": [], "questions": [],
                       "metadata-properties": [], "vectors-settings": [], "records": []}  # fmt: skip
            self.by_id[dataset["id"]] = dataset
            return 201, self._public(dataset)
        found = _PROPERTY.match(path)
        if found and found.group(1) in self.by_id:
            dataset, kind = self.by_id[found.group(1)], found.group(2)
            if method == "GET":
                return 200, {"items": dataset[kind]}
            if method == "POST":
                item = {**body, "id": str(uuid.uuid4()), "dataset_id": dataset["id"], "inserted_at": _now(),
                        "updated_at": _now()}  # fmt: skip
                dataset[kind].append(item)
                return 201, item
        found = _DATASET.match(path)
        if found and found.group(1) in self.by_id:
            dataset, tail = self.by_id[found.group(1)], found.group(2)
            if tail is None and method == "GET":
                return 200, self._public(dataset)
            if tail is None and method == "PATCH":
                dataset.update({k: v for k, v in body.items() if k != "id"}, updated_at=_now())
                return 200, self._public(dataset)
            if tail == "/publish" and method == "PUT":
                if not dataset["fields"] or not dataset["questions"]:
                    return 422, {"detail": "a dataset needs fields and questions to be published"}
                dataset["status"] = "ready"
                return 200, self._public(dataset)
            if tail == "/records" and method == "GET":
                start, size = int(query.get("offset", ["0"])[0]), int(query.get("limit", ["100"])[0])
                items = dataset["records"][start : start + size]
                return 200, {"items": items, "total": len(dataset["records"])}
            if tail == "/records/bulk" and method == "PUT":
                if dataset["status"] != "ready":
                    return 422, {"detail": "records go into a published dataset"}
                stored = [{**r, "id": r.get("id") or str(uuid.uuid4()), "dataset_id": dataset["id"],
                           "status": "pending", "inserted_at": _now(), "updated_at": _now()}
                          for r in body["items"]]  # fmt: skip
                dataset["records"].extend(stored)
                return 200, {"items": stored, "updated_item_ids": []}
        self.unknown.append(f"{method} {path}")
        return 404, {"detail": f"not found: {method} {path}"}

    @staticmethod
    def _public(dataset: dict[str, Any]) -> dict[str, Any]:
        hidden = ("fields", "questions", "metadata-properties", "vectors-settings", "records")
        return {k: v for k, v in dataset.items() if k not in hidden}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                """Quiet."""

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with server.lock:
                    url = urlsplit(self.path)
                    status, answer = server.route(self.command, url.path, body, parse_qs(url.query))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve  # noqa: N815 - stdlib names

        return Handler
