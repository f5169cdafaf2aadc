"""The audit store: one SQLite file in WAL mode (default ``DIR/.bsafe/audit.sqlite``).

Tables: ``meta`` (sample parameters, manifest hash), ``items`` (the audit set, each with a
snapshot of its row), ``annotators`` (token hashes, never tokens), ``sessions`` (hashed session
ids and their CSRF tokens), ``claims`` (which annotator holds which item right now) and
``judgements`` (append-only: an undo or a re-judgement retracts, nothing is deleted).

Every write is one ``BEGIN IMMEDIATE`` transaction committed with ``synchronous=FULL`` before
the call returns, so an acknowledged judgement survives a killed server. Connections are opened
per call (cheap), so any number of server threads and processes can share the file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bsafe_data.audit.folder import default_db_path

SCHEMA_VERSION = "1"
CLAIM_TTL_S = 30 * 60

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY,
    row_id TEXT NOT NULL,
    config TEXT NOT NULL,
    split TEXT NOT NULL,
    kind TEXT NOT NULL,
    grp TEXT NOT NULL,
    category TEXT,
    fifth INTEGER,
    stratum TEXT NOT NULL,
    stratum_size INTEGER NOT NULL,
    borderline INTEGER NOT NULL DEFAULT 0,
    margin REAL,
    replicas INTEGER NOT NULL DEFAULT 1,
    ord INTEGER NOT NULL,
    row_json TEXT NOT NULL,
    UNIQUE (config, row_id)
);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    token_hash BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_hash TEXT PRIMARY KEY,
    annotator TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    item_id INTEGER NOT NULL,
    annotator TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    PRIMARY KEY (item_id, annotator)
);
CREATE TABLE IF NOT EXISTS judgements (
    judgement_id INTEGER PRIMARY KEY AUTOINCREMENT,
    submission_id TEXT NOT NULL UNIQUE,
    item_id INTEGER NOT NULL REFERENCES items (item_id),
    row_id TEXT NOT NULL,
    config TEXT NOT NULL,
    annotator TEXT NOT NULL,
    created_at TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    skipped INTEGER NOT NULL DEFAULT 0,
    answers TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT 'app',
    retracted_at TEXT,
    retracted_by TEXT
);
CREATE INDEX IF NOT EXISTS judgements_by_annotator ON judgements (annotator, retracted_at);
CREATE INDEX IF NOT EXISTS judgements_by_item ON judgements (item_id, retracted_at);
"""

_ITEM_COLUMNS = (
    "item_id, row_id, config, split, kind, grp, category, fifth, stratum, stratum_size, borderline, "
    "margin, replicas, ord"
)


class StoreError(Exception):
    """The audit store is missing, or a request contradicts what it holds."""


def is_text(value: Any) -> bool:
    """Whether ``value`` is a string the store can hold (valid Unicode: no lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def now_iso() -> str:
    """UTC time stamp with milliseconds, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AuditStore:
    """Access to one audit SQLite file. Cheap to create; holds no open connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_folder(
        cls, folder: str | Path, db: str | Path | None = None, *, create: bool = False
    ) -> AuditStore:
        """The store of a dataset folder (``--db`` wins); ``create`` makes the file and tables."""
        path = Path(db) if db else default_db_path(folder)
        if not create and not path.exists():
            raise StoreError(f"no audit set at {path}: run `bsafe-data audit sample {folder}` first")
        store = cls(path)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            with store.connect() as conn:
                conn.executescript(_SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
        return store

    # -- connections -------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """A new connection: WAL journal, synchronous=FULL, 15 s busy timeout, autocommit mode."""
        conn = sqlite3.connect(self.path, timeout=15.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=15000")
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), committed before the block's caller continues."""
        conn = self.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads (each statement sees the last committed state)."""
        conn = self.connect()
        try:
            yield conn
        finally:
            conn.close()

    # -- meta --------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """All meta values, JSON-decoded where they are JSON."""
        with self.read() as conn:
            rows = conn.execute("SELECT key, value FROM meta").fetchall()
        out: dict[str, Any] = {}
        for row in rows:
            try:
                out[row["key"]] = json.loads(row["value"])
            except ValueError:
                out[row["key"]] = row["value"]
        return out

    # -- items -------------------------------------------------------------------------------

    def replace_items(
        self, items: list[dict[str, Any]], meta: dict[str, Any], *, force: bool = False
    ) -> None:
        """Store a new audit set. Refused when judgements exist (they would lose their items)."""
        with self.write() as conn:
            judged = conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
            if judged:
                raise StoreError(
                    f"this audit set already has {judged} judgements; use another --db for a new set"
                )
            existing = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            if existing and not force:
                raise StoreError(f"an audit set of {existing} items exists; pass --force to replace it")
            conn.execute("DELETE FROM claims")
            conn.execute("DELETE FROM items")
            conn.executemany(
                "INSERT INTO items (item_id, row_id, config, split, kind, grp, category, fifth, stratum, "
                "stratum_size, borderline, margin, replicas, ord, row_json) VALUES "
                "(:item_id, :row_id, :config, :split, :kind, :grp, :category, :fifth, :stratum, "
                ":stratum_size, :borderline, :margin, :replicas, :ord, :row_json)",
                [{**item, "row_json": json.dumps(item["row"], ensure_ascii=False)} for item in items],
            )
            for key, value in meta.items():
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value))
                )

    def items(self, *, with_rows: bool = False) -> list[dict[str, Any]]:
        """Every item of the audit set in queue order (``row`` added with ``with_rows``)."""
        cols = _ITEM_COLUMNS + (", row_json" if with_rows else "")
        with self.read() as conn:
            rows = conn.execute(f"SELECT {cols} FROM items ORDER BY ord").fetchall()
        return [_item_dict(r) for r in rows]

    def item(self, item_id: int) -> dict[str, Any] | None:
        """One item with its row snapshot, or None."""
        with self.read() as conn:
            row = conn.execute(
                f"SELECT {_ITEM_COLUMNS}, row_json FROM items WHERE item_id = ?", (item_id,)
            ).fetchone()
        return _item_dict(row) if row else None

    # -- annotators and sessions -------------------------------------------------------------

    def add_annotator(self, name: str, salt: bytes, token_hash: bytes, *, replace: bool = False) -> None:
        """Register an annotator's token hash (``replace`` rotates an existing one's token)."""
        with self.write() as conn:
            exists = conn.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone()
            if exists and not replace:
                raise StoreError(f"annotator {name!r} exists; pass --rotate to give them a new token")
            conn.execute(
                "INSERT OR REPLACE INTO annotators (name, salt, token_hash, created_at) VALUES (?, ?, ?, ?)",
                (name, salt, token_hash, now_iso()),
            )
            if exists:
                conn.execute("DELETE FROM sessions WHERE annotator = ?", (name,))

    def annotator_hashes(self) -> list[tuple[str, bytes, bytes]]:
        """``(name, salt, token_hash)`` of every annotator."""
        with self.read() as conn:
            rows = conn.execute("SELECT name, salt, token_hash FROM annotators ORDER BY name").fetchall()
        return [(r["name"], bytes(r["salt"]), bytes(r["token_hash"])) for r in rows]

    def annotator_names(self) -> list[str]:
        """Names of the registered annotators."""
        return [name for name, _, _ in self.annotator_hashes()]

    def add_session(self, session_hash: str, annotator: str, csrf: str, ttl_s: float) -> None:
        """Store a new session (its id only as a hash)."""
        with self.write() as conn:
            conn.execute("DELETE FROM sessions WHERE expires_at < ?", (time.time(),))
            conn.execute(
                "INSERT INTO sessions (session_hash, annotator, csrf, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (session_hash, annotator, csrf, now_iso(), time.time() + ttl_s),
            )

    def session(self, session_hash: str) -> dict[str, Any] | None:
        """The live session with this hash, or None (expired or unknown)."""
        with self.read() as conn:
            row = conn.execute(
                "SELECT annotator, csrf, expires_at FROM sessions WHERE session_hash = ?", (session_hash,)
            ).fetchone()
        if row is None or row["expires_at"] < time.time():
            return None
        return {"annotator": row["annotator"], "csrf": row["csrf"]}

    def delete_session(self, session_hash: str) -> None:
        """End a session."""
        with self.write() as conn:
            conn.execute("DELETE FROM sessions WHERE session_hash = ?", (session_hash,))

    # -- the queue ---------------------------------------------------------------------------

    def claim_next(self, annotator: str, ttl_s: float = CLAIM_TTL_S) -> int | None:
        """The item this annotator should judge now, claimed for them; None when they are done.

        Their own open claim comes first (a reload shows the same row). Otherwise the first item
        in queue order they have not judged or skipped whose judgements plus other annotators'
        live claims are fewer than its ``replicas`` (2+ for the overlap, 1 otherwise).
        """
        now = time.time()
        with self.write() as conn:
            conn.execute("DELETE FROM claims WHERE claimed_at < ?", (now - ttl_s,))
            own = conn.execute(
                "SELECT c.item_id FROM claims c JOIN items i ON i.item_id = c.item_id "
                "WHERE c.annotator = :a AND NOT EXISTS (SELECT 1 FROM judgements j WHERE "
                "j.item_id = c.item_id AND j.annotator = :a AND j.retracted_at IS NULL) "
                "ORDER BY i.ord LIMIT 1",
                {"a": annotator},
            ).fetchone()
            if own:
                conn.execute(
                    "UPDATE claims SET claimed_at = ? WHERE item_id = ? AND annotator = ?",
                    (now, own[0], annotator),
                )
                return int(own[0])
            row = conn.execute(
                f"SELECT i.item_id FROM items i WHERE {_ELIGIBLE} ORDER BY i.ord LIMIT 1", {"a": annotator}
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "INSERT OR REPLACE INTO claims (item_id, annotator, claimed_at) VALUES (?, ?, ?)",
                (row[0], annotator, now),
            )
            return int(row[0])

    def progress(self, annotator: str) -> dict[str, int]:
        """Counts for the progress bar: done (judged + skipped) and total for this annotator, and the set."""
        with self.read() as conn:
            done = conn.execute(
                "SELECT COUNT(DISTINCT item_id) FROM judgements WHERE annotator = ? AND retracted_at IS NULL",
                (annotator,),
            ).fetchone()[0]
            skipped = conn.execute(
                "SELECT COUNT(DISTINCT item_id) FROM judgements WHERE annotator = ? AND retracted_at IS NULL "
                "AND skipped = 1",
                (annotator,),
            ).fetchone()[0]
            own = conn.execute(
                "SELECT COUNT(*) FROM claims c WHERE c.annotator = :a AND NOT EXISTS (SELECT 1 FROM "
                "judgements j WHERE j.item_id = c.item_id AND j.annotator = :a AND j.retracted_at IS NULL)",
                {"a": annotator},
            ).fetchone()[0]
            eligible = conn.execute(
                f"SELECT COUNT(*) FROM items i WHERE {_ELIGIBLE} AND NOT EXISTS (SELECT 1 FROM claims c "
                "WHERE c.item_id = i.item_id AND c.annotator = :a)",
                {"a": annotator},
            ).fetchone()[0]
            items = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            complete = conn.execute(
                "SELECT COUNT(*) FROM items i WHERE (SELECT COUNT(DISTINCT j.annotator) FROM judgements j "
                "WHERE j.item_id = i.item_id AND j.retracted_at IS NULL AND j.skipped = 0) >= i.replicas"
            ).fetchone()[0]
        return {
            "done": int(done),
            "skipped": int(skipped),
            "total": int(done + own + eligible),
            "set_items": int(items),
            "set_complete": int(complete),
        }

    # -- judgements --------------------------------------------------------------------------

    def record_judgement(
        self,
        *,
        item_id: int,
        annotator: str,
        answers: dict[str, str],
        note: str,
        skipped: bool,
        submission_id: str,
        manifest_sha256: str,
        source: str = "app",
        created_at: str | None = None,
    ) -> tuple[int, bool]:
        """Append a judgement and commit; returns ``(judgement_id, created)``.

        A repeated ``submission_id`` returns the stored judgement (``created`` False): a client
        may retry a POST whose answer it did not see. The annotator's earlier judgement of the
        same item, if any, is retracted as ``superseded``.
        """
        with self.write() as conn:
            found = conn.execute(
                "SELECT judgement_id FROM judgements WHERE submission_id = ?", (submission_id,)
            ).fetchone()
            if found:
                return int(found[0]), False
            item = conn.execute("SELECT row_id, config FROM items WHERE item_id = ?", (item_id,)).fetchone()
            if item is None:
                raise StoreError(f"no item {item_id} in this audit set")
            stamp = now_iso()
            conn.execute(
                "UPDATE judgements SET retracted_at = ?, retracted_by = 'superseded' "
                "WHERE item_id = ? AND annotator = ? AND retracted_at IS NULL",
                (stamp, item_id, annotator),
            )
            cur = conn.execute(
                "INSERT INTO judgements (submission_id, item_id, row_id, config, annotator, created_at, "
                "manifest_sha256, skipped, answers, note, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    submission_id,
                    item_id,
                    item["row_id"],
                    item["config"],
                    annotator,
                    created_at or stamp,
                    manifest_sha256,
                    int(skipped),
                    json.dumps(answers, sort_keys=True),
                    note,
                    source,
                ),
            )
            conn.execute("DELETE FROM claims WHERE item_id = ? AND annotator = ?", (item_id, annotator))
            return int(cur.lastrowid), True

    def undo_last(self, annotator: str) -> dict[str, Any] | None:
        """Retract the annotator's latest live judgement (``undo``) and claim its item again.

        Returns that judgement (item_id, answers, note, skipped) or None when there is nothing to undo.
        """
        with self.write() as conn:
            row = conn.execute(
                "SELECT judgement_id, item_id, answers, note, skipped FROM judgements "
                "WHERE annotator = ? AND retracted_at IS NULL AND source = 'app' "
                "ORDER BY judgement_id DESC LIMIT 1",
                (annotator,),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE judgements SET retracted_at = ?, retracted_by = 'undo' WHERE judgement_id = ?",
                (now_iso(), row["judgement_id"]),
            )
            conn.execute(
                "INSERT OR REPLACE INTO claims (item_id, annotator, claimed_at) VALUES (?, ?, ?)",
                (row["item_id"], annotator, time.time()),
            )
        return {
            "judgement_id": int(row["judgement_id"]),
            "item_id": int(row["item_id"]),
            "answers": json.loads(row["answers"]),
            "note": row["note"],
            "skipped": bool(row["skipped"]),
        }

    def judgements(self, *, include_retracted: bool = False) -> list[dict[str, Any]]:
        """Judgements in the order they were made (live ones only unless ``include_retracted``)."""
        where = "" if include_retracted else "WHERE retracted_at IS NULL"
        with self.read() as conn:
            rows = conn.execute(f"SELECT * FROM judgements {where} ORDER BY judgement_id").fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["answers"] = json.loads(d["answers"])
            d["skipped"] = bool(d["skipped"])
            out.append(d)
        return out


# An item the annotator :a may be handed: not judged or skipped by them, and short of replicas.
_ELIGIBLE = (
    "NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item_id = i.item_id AND j.annotator = :a "
    "AND j.retracted_at IS NULL) AND (SELECT COUNT(DISTINCT j.annotator) FROM judgements j "
    "WHERE j.item_id = i.item_id AND j.retracted_at IS NULL AND j.skipped = 0) + (SELECT COUNT(*) "
    "FROM claims c WHERE c.item_id = i.item_id AND c.annotator <> :a) < i.replicas"
)


def _item_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    if "row_json" in d:
        d["row"] = json.loads(d.pop("row_json"))
    d["borderline"] = bool(d["borderline"])
    return d
