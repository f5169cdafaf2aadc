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

The cache is data, not trusted code: it never stops a build on its own.

* **On open** the file is checked before anything is written to it (``CacheError``, whose one-line
  message names the file and what to do): it must be a SQLite file whose schema page and newest
  table and index pages read back (a truncated or damaged file fails here), holding our
  ``responses`` table or nothing (another program's database is left untouched), of a schema
  version this code knows; the folder must be creatable and the file writable. The full page scan
  (``PRAGMA quick_check``, ~0.5 s per 300 MB) is left to ``stats`` and ``prune``: every build
  process opens the cache, several times.
* **A bad entry is a miss**: a row whose columns have the wrong types (``text`` a BLOB or NULL,
  counts that are not integers) is never served, and a read that SQLite cannot do (a damaged page,
  text that is not UTF-8) misses for just the keys it concerns; the request is asked again and
  the new answer replaces the entry. A write that fails drops those rows (the build has the answers
  in memory). Either is said once per cache object, as a warning naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
#: The columns of our ``responses`` table (a table of that name without them is not ours).
_TABLE_COLUMNS = frozenset(
    (
        "key",
        "model",
        "status",
        "finish_reason",
        "text",
        "input_tokens",
        "output_tokens",
        "detail",
        "created_at",
    )
)
# Rows whose columns hold what ``CachedResponse`` promises; others are never served (checked by
# SQLite in C: no per-row Python on the hot path).
_WELL_TYPED = (
    "typeof(text) = 'text' AND typeof(finish_reason) IN ('text', 'null') "
    "AND typeof(input_tokens) = 'integer' AND typeof(output_tokens) = 'integer' "
    "AND typeof(detail) = 'text' AND typeof(created_at) IN ('real', 'integer')"
)
_KNOWN = "('ok', 'refused', 'truncated', 'error')"  # STATUSES as SQL
_SQLITE_MAGIC = b"SQLite format 3\x00"
_MOVE_AWAY = "move the file away or delete it (its answers are asked again), or use another --cache-dir"


class CacheError(Exception):
    """The cache cannot be used: its one-line message names the file or folder and what to do."""


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


def _problem(path: Path, exc: BaseException) -> str:
    """One line for a SQLite or OS error on the cache file: what is wrong and what to do."""
    code = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc) if not isinstance(exc, OSError) else (exc.strerror or str(exc))
    if "could not decode" in text.lower():  # sqlite3 quotes the stored text: keep it out of the message
        return f"response cache {path} holds text that is not UTF-8: that entry is asked again and replaced"
    lowered = text.lower()
    if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in lowered or "not a database" in lowered:
        return f"response cache {path} is damaged ({text}): {_MOVE_AWAY}"
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in lowered:
        return (
            f"response cache {path} is locked by another process ({text}): let it finish, "
            "or use another --cache-dir"
        )
    if code == "SQLITE_FULL" or "is full" in lowered:
        return f"response cache {path} cannot grow ({text}): free disk space, or use another --cache-dir"
    if (
        code.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH"))
        or isinstance(exc, PermissionError)
        or "readonly" in lowered
        or "unable to open" in lowered
    ):
        return (
            f"response cache {path} cannot be written ({text}): make it and its folder writable, "
            "or use another --cache-dir"
        )
    return f"response cache {path} cannot be used ({text}): {_MOVE_AWAY}"


def _check_header(path: Path) -> None:
    """An existing file must start like a SQLite database (an empty file is a new database)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:  # a folder of that name, no permission
        raise CacheError(_problem(path, exc)) from None
    if head and head != _SQLITE_MAGIC:
        raise CacheError(
            f"response cache {path} is not a SQLite database (damaged, or another program's file): "
            + _MOVE_AWAY
        )


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _check_schema(db: sqlite3.Connection, path: Path) -> None:
    """Our tables or none: another program's database, or a newer schema, is left untouched."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} - {
        "sqlite_sequence",
        "sqlite_stat1",
        "sqlite_stat4",
    }
    ours = ("responses" not in tables or _TABLE_COLUMNS <= _columns(db, "responses")) and (
        "meta" not in tables or {"name", "value"} <= _columns(db, "meta")
    )
    if not ours or tables - {"responses", "meta"}:
        raise CacheError(
            f"response cache {path} is a SQLite database but not a bsafe-data cache (other tables); it is "
            "left as it is: use another --cache-dir, or move the file away"
        )
    if "meta" in tables:
        found = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        if found is not None and str(found[0]) != str(_SCHEMA_VERSION):
            raise CacheError(
                f"response cache {path} has schema version {str(found[0])[:20]!r}, this bsafe-data reads "
                f"version {_SCHEMA_VERSION}: use the bsafe-data that wrote it, or another --cache-dir"
            )
    if "responses" in tables:  # the newest table and index pages: a truncated file fails here
        db.execute("SELECT max(rowid) FROM responses").fetchone()
        db.execute("SELECT max(key) FROM responses").fetchone()


def _open_db(cache_dir: Path) -> tuple[Path, sqlite3.Connection]:
    """Create the folder, check the file (module docstring) and open it: ``(path, connection)``.

    Raises ``CacheError`` with a one-line message naming the folder or file and what to do.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(
            f"response cache folder {cache_dir} cannot be made or used ({exc.strerror or exc}): "
            "pass --cache-dir (or set BSAFE_DATA_CACHE_DIR) to a writable folder"
        ) from None
    path = cache_dir / CACHE_FILENAME
    _check_header(path)
    try:
        db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise CacheError(_problem(path, exc)) from None
    try:
        db.execute("PRAGMA busy_timeout=30000")
        _check_schema(db, path)  # reads only: nothing is written before the file is known to be ours
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),)
        )
    except CacheError:
        db.close()
        raise
    except sqlite3.Error as exc:
        db.close()
        raise CacheError(_problem(path, exc)) from None
    return path, db


def _check_integrity(db: sqlite3.Connection, path: Path) -> None:
    """The full page scan (``PRAGMA quick_check``); ``CacheError`` naming the file when it fails."""
    try:
        found = [row[0] for row in db.execute("PRAGMA quick_check(20)")]
    except sqlite3.Error as exc:
        raise CacheError(_problem(path, exc)) from None
    # NULLs in NOT NULL columns are bad entries (never served), not a damaged file
    damage = [line for line in found if line != "ok" and not str(line).startswith("NULL value in")]
    if damage:
        raise CacheError(f"response cache {path} is damaged ({str(damage[0])[:200]}): {_MOVE_AWAY}")


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
        self.error: BaseException | None = None  # a failed write: said by the next flush(), rows dropped
        self.failure: BaseException | None = None  # anything else (a bug): raised by the next flush()
        self.dropped = 0  # rows not stored (a failed connection or write)
        self.wake = threading.Event()  # set by flush(): stop waiting for more rows

    def run(self) -> None:
        try:
            db: sqlite3.Connection | None = _connect(self.path)
        except sqlite3.DatabaseError as exc:  # rows are dropped; waiters are still released below
            db, self.error = None, exc
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
                if rows and self.failure is None:
                    try:
                        if db is None:
                            raise sqlite3.OperationalError("unable to open database file")
                        _write(db, rows)
                    except sqlite3.DatabaseError as exc:
                        self.dropped += len(rows)
                        self.error = self.error or exc
                    except BaseException as exc:  # reported by the next flush()
                        self.failure = exc
                for waiter in waiters:
                    waiter.set()
                if stop:
                    return
        finally:
            if db is not None:
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
    """The cache database of one directory. Use from one thread at a time.

    Opening it checks the file (``CacheError``, see the module docstring); afterwards no read or
    write raises for what the file holds: bad entries are misses, failed writes are dropped.
    """

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        flush_every: int = 16,
        flush_interval_s: float = 0.1,
        background: bool = False,
    ):
        self.dir = resolve_cache_dir(cache_dir)
        self.path, self._db = _open_db(self.dir)
        self._pending: list[tuple[Any, ...]] = []
        self._flush_every = flush_every
        self._flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()
        self._dropped = 0
        self._warned = False
        self._writer: _Writer | None = None
        if background:
            self._writer = _Writer(self.path)
            self._writer.start()

    @property
    def dropped(self) -> int:
        """Answers that could not be stored (failed writes); the build used them all the same."""
        return self._dropped + (self._writer.dropped if self._writer is not None else 0)

    def _warn(self, exc: BaseException) -> None:
        """Say once per cache object that the file misbehaves; the caller carries on."""
        if not self._warned:
            self._warned = True
            log.warning(
                "%s. Meanwhile entries it cannot read are asked again and answers it cannot store are "
                "not kept",
                _problem(self.path, exc),
            )

    # -- reads -------------------------------------------------------------------------------
    def _select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]] | None:
        """Rows of a read, or None when SQLite cannot do it (said once)."""
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:  # a damaged page, text that is not UTF-8, ...
            self._warn(exc)
            return None

    def get(self, key: str, *, include_unserved: bool = False) -> CachedResponse | None:
        """The stored answer for ``key``; truncated/error rows only with ``include_unserved``.

        A row whose columns have the wrong types, or that SQLite cannot read, is a miss.
        """
        for row in reversed(self._pending):
            if row[0] == key:
                key_, _model, status, finish, text, n_in, n_out, detail, created = row
                hit = CachedResponse(key_, status, text, finish, n_in, n_out, detail, created)
                return hit if include_unserved or hit.status in SERVED_STATUSES else None
        found = self._select(
            f"SELECT {_COLUMNS} FROM responses WHERE key = ? AND status IN {_KNOWN} AND {_WELL_TYPED}", (key,)
        )
        if not found:
            return None
        hit = CachedResponse(*found[-1])
        return hit if include_unserved or hit.status in SERVED_STATUSES else None

    def get_many(self, keys: Sequence[str]) -> dict[str, CachedResponse]:
        """Served answers (ok/refused) for many keys at once; bad entries are misses (see ``get``).

        In background mode rows still queued for the writer are not seen (no waiting on it here).
        """
        if self._writer is None:
            self.flush()
        found: dict[str, CachedResponse] = {}
        unique = list(dict.fromkeys(keys))
        served = f"status IN ('ok', 'refused') AND {_WELL_TYPED}"
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._select(
                f"SELECT {_COLUMNS} FROM responses WHERE key IN ({marks}) AND {served}", chunk
            )
            if rows is None:  # one unreadable entry fails the whole statement: only its key should miss
                rows = []
                for key in chunk:
                    rows.extend(
                        self._select(f"SELECT {_COLUMNS} FROM responses WHERE key = ? AND {served}", (key,))
                        or ()
                    )
            for row in rows:
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
        """Commit pending rows (waits for the writer thread in background mode).

        A write that fails drops its rows and is said once (``dropped`` counts them); it never raises.
        """
        self._last_flush = time.monotonic()
        writer = self._writer
        if writer is not None:
            if writer.is_alive():
                done = threading.Event()
                writer.queue.put(done)
                writer.wake.set()
                done.wait()
            if writer.failure is not None:
                failure, writer.failure = writer.failure, None
                raise failure
            if writer.error is not None:
                error, writer.error = writer.error, None
                self._warn(error)
            return
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            _write(self._db, rows)
        except sqlite3.DatabaseError as exc:  # damaged, full, locked for too long: not this build's end
            self._dropped += len(rows)
            self._warn(exc)

    # -- maintenance -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Entries, bytes on disk, stored text bytes, entries by status, oldest/newest timestamps.

        ``unusable`` counts entries never served (columns of the wrong types: asked again, then
        replaced). Scans every page first: ``CacheError`` when the file is damaged.
        """
        self.flush()
        _check_integrity(self._db, self.path)
        try:
            by_status: dict[str, int] = {status: 0 for status in STATUSES}
            for status, count in self._db.execute("SELECT status, COUNT(*) FROM responses GROUP BY status"):
                name = status if status in by_status else "other"
                by_status[name] = by_status.get(name, 0) + count
            text_bytes, oldest, newest, unusable = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(CAST(text AS BLOB))), 0), MIN(created_at), MAX(created_at), "
                f"COALESCE(SUM(NOT (typeof(status) = 'text' AND status IN {_KNOWN} AND {_WELL_TYPED})), 0) "
                "FROM responses"
            ).fetchone()
        except sqlite3.Error as exc:
            raise CacheError(_problem(self.path, exc)) from None
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
            "unusable": int(unusable),
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
        ``ValueError`` for a negative or non-finite age or an unknown status (before any change);
        ``CacheError`` when the file is damaged (nothing is deleted from a damaged file).
        """
        statuses = None if statuses is None else list(statuses)  # checked, then used: read once
        check_prune_arguments(older_than_days, statuses)
        self.flush()
        _check_integrity(self._db, self.path)
        where: list[str] = []
        params: list[Any] = []
        if older_than_days is not None:
            where.append("created_at < ?")
            params.append(time.time() - older_than_days * 86400.0)
        if statuses is not None:
            wanted = list(dict.fromkeys(statuses))
            if not wanted:
                return 0
            where.append(f"status IN ({','.join('?' * len(wanted))})")
            params.extend(wanted)
        if not where:
            return 0
        try:
            with self._db:
                self._db.execute("BEGIN")
                deleted = self._db.execute(
                    f"DELETE FROM responses WHERE {' AND '.join(where)}", params
                ).rowcount
            if vacuum:
                self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise CacheError(_problem(self.path, exc)) from None
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


def check_prune_arguments(older_than_days: float | None, statuses: Iterable[str] | None) -> None:
    """``ValueError`` for an age that is negative or not finite, or a status that does not exist."""
    if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
        raise ValueError(f"--older-than-days must be a number of days >= 0, not {older_than_days}")
    if statuses is not None:
        unknown = [s for s in dict.fromkeys(statuses) if s not in STATUSES]
        if unknown:
            raise ValueError(f"unknown cache status(es) {unknown}; choose from {list(STATUSES)}")


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
