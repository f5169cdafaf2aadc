"""SQLite (WAL) cache of generator responses.

One row per request key. The key is the sha256 of canonical JSON of the request as sent (model,
messages, sampling parameters, seed) plus the prompt-template version; it never contains the API
key or the endpoint URL, so the same request to another server or with another key is a hit.

Every answer is stored with a status:

* ``ok`` — the model answered (the answer may still fail to parse; parsing is redone on read);
* ``refused`` — a refusal (text heuristics or ``finish_reason=content_filter``); returned from the
  cache *as a refusal*, so a rerun re-asks with the next seed without a request;
* ``truncated`` — ``finish_reason=length``; stored for the record, never served (a lookup misses);
* ``error`` — retries exhausted; stored for the record, never served.

Writes are committed in tiny batches, so a SIGKILL loses at most the requests in flight plus the
last few milliseconds of answers. In the default mode ``put`` commits every 16 rows or 100 ms on
the caller's thread; with ``background=True`` a writer thread commits whatever queued up in the
last 50 ms (SQLite releases the GIL while it writes, so the event loop is barely held up).

The table is a rowid table with a UNIQUE index on the key: new rows append to the table and only
the small index pages are touched at random, about half the cost of a ``WITHOUT ROWID`` table keyed
by the 64-character hex key (measured).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Statuses a cached row can have.
STATUSES = ("ok", "refused", "truncated", "error")
#: Statuses a lookup returns; the others count as misses.
SERVED_STATUSES = frozenset({"ok", "refused"})
CACHE_FILENAME = "responses.sqlite3"
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    finish_reason TEXT,
    text TEXT NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_INSERT_HEAD = (
    "INSERT OR REPLACE INTO responses (key, model, status, finish_reason, text, input_tokens, "
    "output_tokens, detail, created_at) VALUES "
)
_COLUMNS = "key, status, text, finish_reason, input_tokens, output_tokens, detail, created_at"


def default_cache_dir() -> Path:
    """``$BSAFE_DATA_CACHE_DIR`` if set, else ``~/.cache/bsafe-data``."""
    env = os.environ.get("BSAFE_DATA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bsafe-data"


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """An explicit directory wins over the environment variable and the default."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def request_key(body: bytes, template_version: str) -> str:
    """Cache key of a request body that is already canonical JSON (sorted keys, compact).

    Equals the sha256 of the canonical JSON ``{"request": <body>, "template_version": ...}``.
    """
    digest = hashlib.sha256(b'{"request":')
    digest.update(body)
    digest.update(b',"template_version":' + json.dumps(template_version).encode() + b"}")
    return digest.hexdigest()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against process kills, no fsync per commit
    db.execute("PRAGMA busy_timeout=30000")
    return db


_ROW_MARKS = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_CHUNK = 200  # rows per multi-row INSERT (9 parameters each, far below SQLite's limit)


def _write(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert rows in one transaction, many rows per statement.

    One statement per chunk rather than ``executemany``: the sqlite3 module releases and retakes
    the GIL around every statement step, and from the writer thread each retake makes the busy
    event-loop thread hand the GIL over; one step per chunk keeps that to a few hand-overs a commit.
    """
    with db:  # one transaction, committed on exit
        db.execute("BEGIN")
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            params = [value for row in chunk for value in row]
            db.execute(_INSERT_HEAD + ", ".join([_ROW_MARKS] * len(chunk)), params)


_STOP = object()


class _Writer(threading.Thread):
    """Commits queued rows on its own connection, one transaction per ``interval_s`` window."""

    def __init__(self, path: Path, interval_s: float = 0.05):
        super().__init__(name="bsafe-data-cache-writer", daemon=True)
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.path = path
        self.interval_s = interval_s
        self.error: BaseException | None = None
        self.wake = threading.Event()  # set by flush(): stop waiting for more rows

    def run(self) -> None:
        db = _connect(self.path)
        try:
            while True:
                item = self.queue.get()
                if not isinstance(item, threading.Event) and item is not _STOP:
                    self.wake.wait(self.interval_s)  # let a few more rows arrive: one commit for all
                self.wake.clear()
                rows: list[tuple[Any, ...]] = []
                waiters: list[threading.Event] = []
                stop = False
                while True:
                    if item is _STOP:
                        stop = True
                    elif isinstance(item, threading.Event):
                        waiters.append(item)
                    else:
                        rows.append(item)
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        break
                if rows and self.error is None:
                    try:
                        _write(db, rows)
                    except BaseException as exc:  # reported by the next flush()
                        self.error = exc
                for waiter in waiters:
                    waiter.set()
                if stop:
                    return
        finally:
            db.close()


@dataclass(frozen=True)
class CachedResponse:
    """One stored answer."""

    key: str
    status: str
    text: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    detail: str
    created_at: float


class ResponseCache:
    """The cache database of one directory. Use from one thread at a time."""

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        flush_every: int = 16,
        flush_interval_s: float = 0.1,
        background: bool = False,
    ):
        self.dir = resolve_cache_dir(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / CACHE_FILENAME
        self._db = _connect(self.path)
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),)
        )
        self._pending: list[tuple[Any, ...]] = []
        self._flush_every = flush_every
        self._flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()
        self._writer: _Writer | None = None
        if background:
            self._writer = _Writer(self.path)
            self._writer.start()

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: str, *, include_unserved: bool = False) -> CachedResponse | None:
        """The stored answer for ``key``; truncated/error rows only with ``include_unserved``."""
        for row in reversed(self._pending):
            if row[0] == key:
                key_, _model, status, finish, text, n_in, n_out, detail, created = row
                hit = CachedResponse(key_, status, text, finish, n_in, n_out, detail, created)
                return hit if include_unserved or hit.status in SERVED_STATUSES else None
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM responses WHERE key = ?", (key,))
        found = cur.fetchone()
        if found is None:
            return None
        hit = CachedResponse(*found)
        return hit if include_unserved or hit.status in SERVED_STATUSES else None

    def get_many(self, keys: Sequence[str]) -> dict[str, CachedResponse]:
        """Served answers (ok/refused) for many keys at once.

        In background mode rows still queued for the writer are not seen (no waiting on it here).
        """
        if self._writer is None:
            self.flush()
        found: dict[str, CachedResponse] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM responses WHERE key IN ({marks}) AND status IN ('ok', 'refused')",
                chunk,
            )
            for row in cur:
                found[row[0]] = CachedResponse(*row)
        return found

    # -- writes ------------------------------------------------------------------------------
    def put(
        self,
        key: str,
        *,
        model: str,
        status: str,
        text: str,
        finish_reason: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        detail: str = "",
    ) -> None:
        """Store (or replace) one answer; committed within milliseconds (see the module docstring)."""
        if status not in STATUSES:
            raise ValueError(f"unknown cache status {status!r}")
        row = (key, model, status, finish_reason, text, input_tokens, output_tokens, detail, time.time())
        if self._writer is not None:
            self._writer.queue.put(row)
            return
        self._pending.append(row)
        mono = time.monotonic()
        if len(self._pending) >= self._flush_every or mono - self._last_flush >= self._flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Commit pending rows (waits for the writer thread in background mode)."""
        self._last_flush = time.monotonic()
        writer = self._writer
        if writer is not None:
            if writer.is_alive():
                done = threading.Event()
                writer.queue.put(done)
                writer.wake.set()
                done.wait()
            if writer.error is not None:
                error, writer.error = writer.error, None
                raise error
            return
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        _write(self._db, rows)

    # -- maintenance -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Entries, bytes on disk, stored text bytes, entries by status, oldest/newest timestamps."""
        self.flush()
        by_status = {status: 0 for status in STATUSES}
        for status, count in self._db.execute("SELECT status, COUNT(*) FROM responses GROUP BY status"):
            by_status[status] = count
        text_bytes, oldest, newest = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(CAST(text AS BLOB))), 0), MIN(created_at), MAX(created_at) "
            "FROM responses"
        ).fetchone()
        disk = sum(
            p.stat().st_size
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
            if p.exists()
        )
        return {
            "path": str(self.path),
            "entries": sum(by_status.values()),
            "bytes": disk,
            "text_bytes": int(text_bytes),
            "by_status": by_status,
            "oldest": oldest,
            "newest": newest,
        }

    def prune(
        self,
        older_than_days: float | None = None,
        statuses: Iterable[str] | None = None,
        *,
        vacuum: bool = False,
    ) -> int:
        """Delete entries older than ``older_than_days`` and/or with one of ``statuses``.

        With neither argument nothing is deleted. Returns the number of deleted entries.
        """
        self.flush()
        where: list[str] = []
        params: list[Any] = []
        if older_than_days is not None:
            where.append("created_at < ?")
            params.append(time.time() - older_than_days * 86400.0)
        if statuses is not None:
            wanted = list(dict.fromkeys(statuses))
            unknown = [s for s in wanted if s not in STATUSES]
            if unknown:
                raise ValueError(f"unknown cache status(es) {unknown}; choose from {list(STATUSES)}")
            if not wanted:
                return 0
            where.append(f"status IN ({','.join('?' * len(wanted))})")
            params.extend(wanted)
        if not where:
            return 0
        with self._db:
            self._db.execute("BEGIN")
            deleted = self._db.execute(f"DELETE FROM responses WHERE {' AND '.join(where)}", params).rowcount
        if vacuum:
            self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def close(self) -> None:
        """Commit pending rows and close the database."""
        try:
            self.flush()
        finally:
            if self._writer is not None and self._writer.is_alive():
                self._writer.queue.put(_STOP)
                self._writer.join()
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cache_stats(cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Statistics of the cache in ``cache_dir`` (default: see ``default_cache_dir``)."""
    with ResponseCache(cache_dir) as cache:
        return cache.stats()


def cache_prune(
    cache_dir: str | Path | None = None,
    older_than_days: float | None = None,
    statuses: Iterable[str] | None = None,
    *,
    vacuum: bool = True,
) -> int:
    """Delete old and/or unwanted entries (e.g. ``statuses=["error", "truncated"]``); returns the count."""
    with ResponseCache(cache_dir) as cache:
        return cache.prune(older_than_days, statuses, vacuum=vacuum)
