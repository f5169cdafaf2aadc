"""A small Hugging Face Hub-compatible HTTP server for tests (127.0.0.1, random port, in-process thread).

It speaks enough of the Hub API for the real ``huggingface_hub`` client (``HfApi``: whoami, create_repo,
repo info, preupload, LFS batch/upload/verify, NDJSON commits with ``parentCommit``, refs, tags, tree,
paths-info, settings) and for ``datasets.load_dataset("org/name", revision="v1.0.0")`` (resolve with
``X-Repo-Commit``/``ETag``/``X-Linked-*`` headers, HEAD and Range)::

    with HubServer(bad_tokens={"hf_bad"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "dummy"}
        ...
        hub.commit_count("org/ds")          # commits made through the commit endpoint
        hub.lfs_puts                        # Counter: sha256 -> number of LFS PUT uploads
        hub.count("commit", status=200)     # requests by route name (see ``ROUTES``)
        hub.fail("commit", status=503)      # the next commit request answers 503
        hub.hold("commit")                  # commit requests block until ``hub.release()``

Storage is in memory and git-like: every commit is an immutable snapshot ``path -> FileEntry``; LFS
objects are stored per repository by sha256, and the LFS batch endpoint answers objects it already has
without ``actions``, so the client skips re-uploading them. Any token is accepted except the
``bad_tokens`` (401) and ``read_only_tokens`` (role ``read``, 403 on writes). Private repositories
need a valid token to be read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

ROUTES = (
    "whoami",
    "create",
    "validate-yaml",
    "info",
    "settings",
    "preupload",
    "commit",
    "commits",
    "refs",
    "tag",
    "tree",
    "paths-info",
    "lfs-batch",
    "lfs-upload",
    "lfs-verify",
    "resolve",
    "agent-harnesses",
)
TYPE_PREFIX = {"models": "", "datasets": "datasets/", "spaces": "spaces/"}
LFS_EXTENSIONS = (
    ".parquet",
    ".arrow",
    ".png",
    ".jpg",
    ".jpeg",
    ".bin",
    ".safetensors",
    ".zip",
    ".gz",
    ".zst",
)
LFS_MIN_SIZE = 10 * 1024 * 1024
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PR_REF = re.compile(r"^refs/pr/(\d+)$")


class HubError(Exception):
    """An HTTP error answer: status, message and the Hub's ``X-Error-Code``."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git for an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class FileEntry:
    """A file in a commit: regular (``content``) or LFS (``lfs_oid``, content in the repo's LFS store)."""

    size: int
    blob_id: str
    content: bytes | None = None
    lfs_oid: str | None = None

    @classmethod
    def regular(cls, data: bytes) -> FileEntry:
        return cls(size=len(data), blob_id=git_blob_sha1(data), content=data)

    @classmethod
    def lfs(cls, oid: str, size: int) -> FileEntry:
        return cls(size=size, blob_id=git_blob_sha1(lfs_pointer(oid, size)), lfs_oid=oid)

    def tree_json(self, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": path}
        if self.lfs_oid:
            pointer = len(lfs_pointer(self.lfs_oid, self.size))
            out["lfs"] = {"oid": self.lfs_oid, "size": self.size, "pointerSize": pointer}
        return out


@dataclass
class Commit:
    """An immutable snapshot of the repository."""

    sha: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    description: str
    date: str


@dataclass
class Repo:
    """One repository: commits, refs and its LFS object store."""

    repo_type: str  # "models" | "datasets" | "spaces"
    repo_id: str
    private: bool = False
    gated: str | bool = False
    created_at: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)

    def resolve(self, rev: str) -> str:
        """A commit sha for a branch, tag, ``refs/...`` name or full sha; 404 RevisionNotFound otherwise."""
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", None)):
            if rev.startswith(prefix):
                name = rev[len(prefix) :]
                if refs is not None and name in refs:
                    return refs[name]
                if refs is None and name in self.tags:
                    return self.tags[name][0]
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev][0]
        match = _PR_REF.match(rev)
        if match and int(match.group(1)) in self.prs:
            return self.prs[int(match.group(1))]
        if _SHA1.match(rev) and rev in self.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


class HubState:
    """All repositories, counters, the request log and fault injection; thread-safe."""

    def __init__(self, bad_tokens: set[str], read_only_tokens: set[str], user: str, orgs: list[str]):
        self.lock = threading.RLock()
        self.bad_tokens = set(bad_tokens)
        self.read_only_tokens = set(read_only_tokens)
        self.user = user
        self.orgs = list(orgs)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[dict[str, Any]] = []
        self.api_commits: Counter[str] = Counter()
        self.lfs_puts: Counter[str] = Counter()
        self.faults: list[dict[str, Any]] = []
        self.holds: dict[str, threading.Event] = {}
        self.before_commit: list[Callable[[Repo], None]] = []
        self._serial = 0

    # -- commits ---------------------------------------------------------------------------------
    def new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str, description: str = ""
    ) -> Commit:
        with self.lock:
            self._serial += 1
            seed = json.dumps(
                [
                    repo.repo_id,
                    parent,
                    sorted((p, f.blob_id) for p, f in files.items()),
                    title,
                    self._serial,
                    time.time(),
                ]
            )
            sha = hashlib.sha1(seed.encode()).hexdigest()
            commit = Commit(sha, parent, files, title, description, _now())
            repo.commits[commit.sha] = commit
            return commit


class HubServer:
    """The server: ``url``, ``start()``/``stop()`` or a context manager, plus inspection helpers."""

    def __init__(
        self,
        *,
        bad_tokens: set[str] | None = None,
        read_only_tokens: set[str] | None = None,
        user: str = "tester",
        orgs: list[str] | None = None,
    ):
        self.state = HubState(bad_tokens or set(), read_only_tokens or set(), user, orgs or ["org"])
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> HubServer:
        state = self.state

        class Handler(_Handler):
            hub = state

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- inspection ------------------------------------------------------------------------------
    @property
    def log(self) -> list[dict[str, Any]]:
        """Every request: ``{"method", "path", "route", "repo", "status"}`` (status filled when answered)."""
        with self.state.lock:
            return [dict(entry) for entry in self.state.log]

    @property
    def lfs_puts(self) -> Counter[str]:
        """Number of LFS PUT uploads per sha256."""
        with self.state.lock:
            return Counter(self.state.lfs_puts)

    def count(
        self, route: str, *, method: str | None = None, status: int | None = None, repo: str | None = None
    ) -> int:
        """Number of logged requests for a route (optionally by method, answered status and repo)."""
        return sum(
            1
            for e in self.log
            if e["route"] == route
            and (method is None or e["method"] == method)
            and (status is None or e["status"] == status)
            and (repo is None or e["repo"] == repo)
        )

    def commit_count(self, repo_id: str | None = None) -> int:
        """Commits created through the commit endpoint (all repos, or one)."""
        with self.state.lock:
            counts = self.state.api_commits
            return sum(counts.values()) if repo_id is None else counts[repo_id]

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        """The stored repository (raises KeyError if missing)."""
        return self.state.repos[(repo_type + "s", repo_id)]

    def files(self, repo_id: str, rev: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        """The content of every file at a revision."""
        repo = self.repo(repo_id, repo_type)
        commit = repo.commits[repo.resolve(rev)]
        return {
            p: f.content if f.content is not None else repo.lfs[f.lfs_oid or ""]
            for p, f in commit.files.items()
        }

    # -- test controls ---------------------------------------------------------------------------
    def fail(
        self,
        route: str,
        status: int = 500,
        times: int = 1,
        method: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` requests of ``route`` with ``status`` (before handling them)."""
        with self.state.lock:
            self.state.faults.append(
                {"route": route, "status": status, "times": times, "method": method, "headers": headers or {}}
            )

    def hold(self, route: str) -> threading.Event:
        """Make requests of ``route`` block (then answer 503) until ``release()``: simulates a hang."""
        with self.state.lock:
            event = self.state.holds.setdefault(route, threading.Event())
            event.clear()
            return event

    def release(self) -> None:
        """Unblock held requests and stop holding."""
        with self.state.lock:
            holds, self.state.holds = self.state.holds, {}
        for event in holds.values():
            event.set()

    def before_next_commit(self, hook: Callable[[Repo], None]) -> None:
        """Run ``hook(repo)`` once, inside the next commit request, before its parent check."""
        with self.state.lock:
            self.state.before_commit.append(hook)

    def commit_files(
        self,
        repo_id: str,
        files: dict[str, bytes],
        title: str = "Direct commit",
        branch: str = "main",
        repo_type: str = "dataset",
    ) -> str:
        """Commit files directly (as another writer would), not counted in ``commit_count``."""
        with self.state.lock:
            repo = self.repo(repo_id, repo_type)
            parent = repo.branches[branch]
            snapshot = dict(repo.commits[parent].files)
            for path, data in files.items():
                snapshot[path] = FileEntry.regular(data)
            commit = self.state.new_commit(repo, parent, snapshot, title)
            repo.branches[branch] = commit.sha
            return commit.sha


# ------------------------------------------------------------------------------------------------
# Request handling
# ------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubState  # set on the subclass made by HubServer.start
    server_version = "hub-test/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # -- plumbing --------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._status = status

    def _json(
        self,
        status: int,
        data: Any,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self._send(status, json.dumps(data).encode(), headers, content_type)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _check_token(self, *, required: bool, write: bool = False) -> str | None:
        token = self._token()
        if token is not None and token in self.hub.bad_tokens:
            raise HubError(
                401,
                "Invalid credentials in Authorization header",
                headers={"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        if required and token is None:
            raise HubError(401, "You must be authenticated to access this endpoint.")
        if write and token in self.hub.read_only_tokens:
            raise HubError(403, "You don't have the rights to write to this repository (read-only token).")
        return token

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or '127.0.0.1'}"

    def _dispatch(self, method: str) -> None:
        self._status = 0
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        route, handler, args = self._route(method, segments)
        entry = {
            "method": method,
            "path": self.path,
            "route": route,
            "repo": args.get("repo_id"),
            "status": None,
        }
        with self.hub.lock:
            self.hub.log.append(entry)
        try:
            body = self._read_body() if method in ("POST", "PUT") else b""
            if handler is None:
                raise HubError(404, f"No route for {method} {split.path}")
            self._maybe_fault(route, method)
            handler(body=body, query=query, **args)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers.setdefault("X-Error-Message", err.message)
            self._json(err.status, {"error": err.message}, headers)
        except (BrokenPipeError, ConnectionResetError):
            self._status = -1
        except Exception as exc:  # a bug in the test server: surface it as a 500 with the message
            self._json(500, {"error": f"test hub server error: {type(exc).__name__}: {exc}"})
        with self.hub.lock:
            entry["status"] = self._status

    def _maybe_fault(self, route: str, method: str) -> None:
        with self.hub.lock:
            hold = self.hub.holds.get(route)
            fault = next(
                (
                    f
                    for f in self.hub.faults
                    if f["route"] == route
                    and f["times"] > 0
                    and (f["method"] is None or f["method"] == method)
                ),
                None,
            )
            if fault is not None:
                fault["times"] -= 1
        if hold is not None:
            hold.wait(timeout=60)
            raise HubError(503, "held request released")
        if fault is not None:
            raise HubError(fault["status"], f"injected fault on {route}", headers=fault["headers"])

    def _route(self, method: str, seg: list[str]) -> tuple[str, Any, dict[str, Any]]:
        """Route name, handler and its keyword arguments for a path (split and unquoted)."""
        none: tuple[str, Any, dict[str, Any]] = ("unknown", None, {})
        if seg[:2] == ["api", "whoami-v2"]:
            return "whoami", self.h_whoami, {}
        if seg[:2] == ["api", "agent-harnesses"]:  # huggingface_hub's best-effort telemetry registry
            return "agent-harnesses", self.h_agent_harnesses, {}
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return "create", self.h_create, {}
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return "validate-yaml", self.h_validate_yaml, {}
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in TYPE_PREFIX:
            kind, repo_id, rest = seg[1], f"{seg[2]}/{seg[3]}", seg[4:]
            args: dict[str, Any] = {"kind": kind, "repo_id": repo_id}
            if not rest and method == "GET":
                return "info", self.h_info, {**args, "rev": None}
            action = rest[0] if rest else ""
            tail = rest[1:]
            if action == "revision" and len(tail) == 1 and method == "GET":
                return "info", self.h_info, {**args, "rev": tail[0]}
            if action == "settings" and method == "PUT":
                return "settings", self.h_settings, args
            if action == "preupload" and len(tail) == 1 and method == "POST":
                return "preupload", self.h_preupload, {**args, "rev": tail[0]}
            if action == "commit" and len(tail) == 1 and method == "POST":
                return "commit", self.h_commit, {**args, "rev": tail[0]}
            if action == "commits" and len(tail) == 1 and method == "GET":
                return "commits", self.h_commits, {**args, "rev": tail[0]}
            if action == "refs" and not tail and method == "GET":
                return "refs", self.h_refs, args
            if action == "tag" and len(tail) == 1 and method in ("POST", "DELETE"):
                return "tag", self.h_tag, {**args, "rev": tail[0], "method": method}
            if action == "tree" and tail and method == "GET":
                return "tree", self.h_tree, {**args, "rev": tail[0], "path": "/".join(tail[1:]).strip("/")}
            if action == "paths-info" and len(tail) == 1 and method == "POST":
                return "paths-info", self.h_paths_info, {**args, "rev": tail[0]}
            return none
        if seg and seg[0] == "_lfs" and len(seg) == 5 and method == "PUT":
            args = {"kind": seg[1], "repo_id": f"{seg[2]}/{seg[3]}", "oid": seg[4]}
            return "lfs-upload", self.h_lfs_upload, args
        if seg and seg[0] == "_lfs_verify" and len(seg) == 4 and method == "POST":
            return "lfs-verify", self.h_lfs_verify, {"kind": seg[1], "repo_id": f"{seg[2]}/{seg[3]}"}
        kind = "models"
        if seg and seg[0] in ("datasets", "spaces"):
            kind, seg = seg[0], seg[1:]
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return "lfs-batch", self.h_lfs_batch, {"kind": kind, "repo_id": f"{seg[0]}/{seg[1][:-4]}"}
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return (
                "resolve",
                self.h_resolve,
                {"kind": kind, "repo_id": f"{seg[0]}/{seg[1]}", "rev": seg[3], "path": "/".join(seg[4:])},
            )
        return none

    # -- helpers ---------------------------------------------------------------------------------
    def _repo(self, kind: str, repo_id: str, *, write: bool = False) -> Repo:
        token = self._check_token(required=write, write=write)
        repo = self.hub.repos.get((kind, repo_id))
        if repo is None or (repo.private and token is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        return repo.commits[repo.resolve(rev)]

    @staticmethod
    def _dirs(files: dict[str, FileEntry]) -> set[str]:
        out: set[str] = set()
        for path in files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return out

    @staticmethod
    def _dir_json(files: dict[str, FileEntry], path: str) -> dict[str, Any]:
        inside = sorted((p, f.blob_id) for p, f in files.items() if p.startswith(path + "/"))
        oid = hashlib.sha1(json.dumps(inside).encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def _repo_url(self, repo: Repo) -> str:
        return f"{self._base()}/{TYPE_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- endpoints -------------------------------------------------------------------------------
    def h_whoami(self, body: bytes, query: dict[str, str]) -> None:
        token = self._check_token(required=True)
        role = "read" if token in self.hub.read_only_tokens else "write"
        self._json(
            200,
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": "Test User",
                "email": "tester@example.com",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "orgs": [{"type": "org", "name": o, "roleInOrg": "admin"} for o in self.hub.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            },
        )

    def h_agent_harnesses(self, body: bytes, query: dict[str, str]) -> None:
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def h_create(self, body: bytes, query: dict[str, str]) -> None:
        self._check_token(required=True, write=True)
        payload = json.loads(body or b"{}")
        kind = (payload.get("type") or "model") + "s"
        namespace = payload.get("organization") or self.hub.user
        repo_id = f"{namespace}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub.lock:
            existing = self.hub.repos.get((kind, repo_id))
            if existing is not None:
                self._json(
                    409,
                    {"error": "You already created this repo", "url": self._repo_url(existing)},
                    {"X-Error-Message": "You already created this repo"},
                )
                return
            repo = Repo(kind, repo_id, private=private)
            initial = self.hub.new_commit(
                repo, None, {".gitattributes": FileEntry.regular(_GITATTRIBUTES)}, "initial commit"
            )
            repo.branches["main"] = initial.sha
            self.hub.repos[(kind, repo_id)] = repo
        self._json(200, {"url": self._repo_url(repo), "name": repo_id, "id": "0" * 24})

    def h_validate_yaml(self, body: bytes, query: dict[str, str]) -> None:
        self._check_token(required=False)
        content = json.loads(body or b"{}").get("content", "")
        errors: list[dict[str, str]] = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            try:
                meta = yaml.safe_load(content[3:end] if end > 0 else "")
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def h_info(self, body: bytes, query: dict[str, str], kind: str, repo_id: str, rev: str | None) -> None:
        with self.hub.lock:
            repo = self._repo(kind, repo_id)
            commit = self._commit_at(repo, rev or "main")
            blobs = query.get("blobs", "").lower() in ("1", "true")
            siblings = []
            for path, entry in sorted(commit.files.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sibling.update(size=entry.size, blobId=entry.blob_id)
                    if entry.lfs_oid:
                        sibling["lfs"] = {
                            "size": entry.size,
                            "sha256": entry.lfs_oid,
                            "pointerSize": len(lfs_pointer(entry.lfs_oid, entry.size)),
                        }
                siblings.append(sibling)
            card_data = None
            readme = commit.files.get("README.md")
            if readme is not None and readme.content is not None:
                card_data = _front_matter(readme.content.decode("utf-8", "replace"))
            self._json(
                200,
                {
                    "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                    "id": repo_id,
                    "author": repo_id.split("/")[0],
                    "sha": commit.sha,
                    "lastModified": commit.date,
                    "createdAt": repo.created_at,
                    "private": repo.private,
                    "gated": repo.gated,
                    "disabled": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "cardData": card_data,
                    "siblings": siblings,
                    "usedStorage": sum(len(v) for v in repo.lfs.values()),
                },
            )

    def h_settings(self, body: bytes, query: dict[str, str], kind: str, repo_id: str) -> None:
        payload = json.loads(body or b"{}")
        with self.hub.lock:
            repo = self._repo(kind, repo_id, write=True)
            if "gated" in payload:
                if payload["gated"] not in ("auto", "manual", False):
                    raise HubError(400, f"invalid gated value {payload['gated']!r}")
                repo.gated = payload["gated"]
            if "visibility" in payload:
                repo.private = payload["visibility"] == "private"
            if "private" in payload:
                repo.private = bool(payload["private"])
        self._json(200, {})

    def h_preupload(self, body: bytes, query: dict[str, str], kind: str, repo_id: str, rev: str) -> None:
        payload = json.loads(body or b"{}")
        with self.hub.lock:
            repo = self._repo(kind, repo_id, write=True)
            files = self._commit_at(repo, rev).files
        out = []
        for item in payload.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            path, size = item["path"], int(item.get("size", 0))
            lfs = path.lower().endswith(LFS_EXTENSIONS) or size >= LFS_MIN_SIZE or b"\0" in sample
            existing = files.get(path)
            oid = None if existing is None else (existing.lfs_oid or existing.blob_id)
            mode = "lfs" if lfs else "regular"
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": out, "commitOid": self._commit_at(repo, rev).sha})

    def h_lfs_batch(self, body: bytes, query: dict[str, str], kind: str, repo_id: str) -> None:
        payload = json.loads(body or b"{}")
        with self.hub.lock:
            repo = self._repo(kind, repo_id, write=payload.get("operation") == "upload")
            have = {oid: len(data) for oid, data in repo.lfs.items()}
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if not _SHA256.match(oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}})
            elif have.get(oid) == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, no upload
            else:
                href = f"{self._base()}/_lfs/{kind}/{repo_id}/{oid}"
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": href, "header": {}},
                            "verify": {"href": f"{self._base()}/_lfs_verify/{kind}/{repo_id}", "header": {}},
                        },
                    }
                )
        self._json(
            200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    def h_lfs_upload(self, body: bytes, query: dict[str, str], kind: str, repo_id: str, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256")
        with self.hub.lock:
            repo = self.hub.repos.get((kind, repo_id))
            if repo is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            repo.lfs[oid] = body
            self.hub.lfs_puts[oid] += 1
        self._send(200, b"")

    def h_lfs_verify(self, body: bytes, query: dict[str, str], kind: str, repo_id: str) -> None:
        payload = json.loads(body or b"{}")
        with self.hub.lock:
            repo = self._repo(kind, repo_id, write=True)
            stored = repo.lfs.get(payload.get("oid", ""))
            if stored is None or len(stored) != payload.get("size"):
                raise HubError(404, "LFS object not found")
        self._json(200, {})

    def h_commit(self, body: bytes, query: dict[str, str], kind: str, repo_id: str, rev: str) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the commit header")
        header = lines[0]["value"]
        create_pr = query.get("create_pr") in ("1", "true", "True")
        with self.hub.lock:
            repo = self._repo(kind, repo_id, write=True)
            hooks, self.hub.before_commit = self.hub.before_commit, []
        for hook in hooks:
            hook(repo)
        with self.hub.lock:
            head = repo.resolve(rev)
            parent_wanted = header.get("parentCommit")
            if parent_wanted and parent_wanted != head and not create_pr:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            base = parent_wanted if (create_pr and parent_wanted in repo.commits) else head
            snapshot = dict(repo.commits[base].files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    data = (
                        base64.b64decode(value["content"])
                        if value.get("encoding") == "base64"
                        else value["content"].encode()
                    )
                    snapshot[path] = FileEntry.regular(data)
                elif key == "lfsFile":
                    oid = value["oid"]
                    if oid not in repo.lfs:
                        raise HubError(422, f"LFS pointer {path} refers to an object that was never uploaded")
                    snapshot[path] = FileEntry.lfs(oid, len(repo.lfs[oid]))
                elif key == "deletedFile":
                    if snapshot.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in snapshot if p.startswith(prefix)]:
                        del snapshot[p]
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            commit = self.hub.new_commit(
                repo, base, snapshot, header.get("summary", ""), header.get("description", "")
            )
            pr_url = None
            if create_pr:
                number = max([0, *repo.prs]) + 1
                repo.prs[number] = commit.sha
                pr_url = f"{self._repo_url(repo)}/discussions/{number}"
            elif _PR_REF.match(rev):
                repo.prs[int(_PR_REF.match(rev).group(1))] = commit.sha  # type: ignore[union-attr]
            else:
                branch = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
                if branch not in repo.branches:
                    raise HubError(404, f"branch {rev} not found", "RevisionNotFound")
                repo.branches[branch] = commit.sha
            self.hub.api_commits[repo_id] += 1
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "pullRequestUrl": pr_url,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
            },
        )

    def h_commits(self, body: bytes, query: dict[str, str], kind: str, repo_id: str, rev: str) -> None:
        with self.hub.lock:
            repo = self._repo(kind, repo_id)
            sha: str | None = repo.resolve(rev)
            out = []
            while sha is not None:
                commit = repo.commits[sha]
                out.append(
                    {
                        "id": commit.sha,
                        "title": commit.title,
                        "message": commit.description,
                        "date": commit.date,
                        "authors": [{"user": self.hub.user}],
                        "parents": [commit.parent] if commit.parent else [],
                    }
                )
                sha = commit.parent
        self._json(200, out)

    def h_refs(self, body: bytes, query: dict[str, str], kind: str, repo_id: str) -> None:
        with self.hub.lock:
            repo = self._repo(kind, repo_id)
            data: dict[str, Any] = {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo.branches.items()
                ],
                "converts": [],
                "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, (s, _) in repo.tags.items()
                ],
            }
            if query.get("include_prs"):
                data["pullRequests"] = [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                    for n, s in repo.prs.items()
                ]
        self._json(200, data)

    def h_tag(
        self, body: bytes, query: dict[str, str], kind: str, repo_id: str, rev: str, method: str
    ) -> None:
        with self.hub.lock:
            repo = self._repo(kind, repo_id, write=True)
            if method == "DELETE":
                if repo.tags.pop(rev, None) is None:
                    raise HubError(404, f"tag {rev} not found", "RevisionNotFound")
                self._json(200, {})
                return
            payload = json.loads(body or b"{}")
            tag = payload.get("tag") or ""
            if not tag or tag in repo.tags or tag in repo.branches:
                raise HubError(409, f"Tag {tag!r} already exists" if tag else "tag name missing")
            repo.tags[tag] = (repo.resolve(rev), payload.get("message"))
        self._json(200, {})

    def h_tree(
        self, body: bytes, query: dict[str, str], kind: str, repo_id: str, rev: str, path: str
    ) -> None:
        recursive = query.get("recursive", "").lower() in ("1", "true")
        with self.hub.lock:
            repo = self._repo(kind, repo_id)
            files = self._commit_at(repo, rev).files
        dirs = self._dirs(files)
        if path and path not in dirs:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        prefix = path + "/" if path else ""
        out = []
        for d in sorted(dirs):
            rel = d[len(prefix) :] if d.startswith(prefix) else None
            if rel and (recursive or "/" not in rel):
                out.append(self._dir_json(files, d))
        for p, entry in sorted(files.items()):
            rel = p[len(prefix) :] if p.startswith(prefix) else None
            if rel and (recursive or "/" not in rel):
                out.append(entry.tree_json(p))
        self._json(200, out)

    def h_paths_info(self, body: bytes, query: dict[str, str], kind: str, repo_id: str, rev: str) -> None:
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        with self.hub.lock:
            repo = self._repo(kind, repo_id)
            files = self._commit_at(repo, rev).files
        dirs = self._dirs(files)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(files[p].tree_json(p))
            elif p in dirs:
                out.append(self._dir_json(files, p))
        self._json(200, out)

    def h_resolve(
        self, body: bytes, query: dict[str, str], kind: str, repo_id: str, rev: str, path: str
    ) -> None:
        with self.hub.lock:
            repo = self._repo(kind, repo_id)
            commit = self._commit_at(repo, rev)
            entry = commit.files.get(path)
            data = None
            if entry is not None:
                data = entry.content if entry.content is not None else repo.lfs[entry.lfs_oid or ""]
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if entry is None or data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers=headers)
        if entry.lfs_oid:
            headers.update(
                {
                    "ETag": f'"{entry.lfs_oid}"',
                    "X-Linked-Etag": f'"{entry.lfs_oid}"',
                    "X-Linked-Size": str(entry.size),
                }
            )
        else:
            headers["ETag"] = f'"{entry.blob_id}"'
        content_type = "text/plain; charset=utf-8" if entry.lfs_oid is None else "application/octet-stream"
        ranged = _parse_range(self.headers.get("Range"), len(data))
        if ranged == "invalid":
            self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            return
        if ranged is not None:
            start, end = ranged
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], headers, content_type)
            return
        self._send(200, data, headers, content_type)


def _parse_range(header: str | None, total: int) -> tuple[int, int] | str | None:
    """(start, end) inclusive for one ``bytes=`` range; ``"invalid"`` if unsatisfiable, None if absent."""
    if not header or not header.startswith("bytes="):
        return None
    spec = header[6:].split(",")[0].strip()
    first, _, last = spec.partition("-")
    if first == "":
        length = int(last)
        if length <= 0:
            return "invalid"
        return max(0, total - length), total - 1
    start = int(first)
    end = min(int(last), total - 1) if last else total - 1
    if start >= total or end < start:
        return "invalid"
    return start, end


def _front_matter(text: str) -> dict[str, Any] | None:
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


_GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"

__all__ = ["FileEntry", "HubError", "HubServer", "Repo"]
