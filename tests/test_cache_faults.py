"""The response cache is data: damaged entries are asked again, a damaged file is named, never a crash.

Builds run the real CLI against the OpenAI-compatible test server (``generator.provider: openai``),
so every cache miss shows up as a request the server counts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_server import ServerProcess  # noqa: E402

from bsafe_data.llm.cache import CacheError, ResponseCache  # noqa: E402
from tests.test_faults import KEY, cli, corpus, good_rows, llm_build, parquet_bytes  # noqa: E402

DB = "responses.sqlite3"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(model="gen-model", api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def built(server, tmp_path_factory):
    """One build with a fresh cache: (corpus, cache folder, output folder, requests it sent)."""
    tmp = tmp_path_factory.mktemp("cache_faults")
    path = corpus(tmp / "c.jsonl", good_rows(6))
    server.reset()
    proc = llm_build(server, path, tmp / "first", tmp / "cache")
    assert proc.returncode == 0, proc.stderr
    sent = server.stats()["chat"]
    assert sent == 6  # one injected row per source row, every one asked
    return path, tmp / "cache", tmp / "first", sent


def one_message(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "building" not in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / DB).read_bytes()).hexdigest()


def damage_entries(cache: Path) -> None:
    """Four of the six entries made bad the way a hand edit or another tool could: the table keeps our
    columns (and the unique key) but not the NOT NULL constraints."""
    db = sqlite3.connect(cache / DB)
    db.executescript(
        """
        CREATE TABLE loose (key TEXT NOT NULL UNIQUE, model TEXT, status TEXT, finish_reason TEXT, text TEXT,
                            input_tokens INTEGER, output_tokens INTEGER, detail TEXT, created_at REAL);
        INSERT INTO loose SELECT key, model, status, finish_reason, text, input_tokens, output_tokens, detail,
                                 created_at FROM responses ORDER BY rowid;
        DROP TABLE responses;
        ALTER TABLE loose RENAME TO responses;
        UPDATE responses SET text = CAST(text AS BLOB) WHERE rowid = 1;
        UPDATE responses SET text = NULL WHERE rowid = 2;
        UPDATE responses SET input_tokens = 'many' WHERE rowid = 3;
        UPDATE responses SET text = CAST(X'3c6861726d66756c3eff' AS TEXT) WHERE rowid = 4;
        """
    )
    db.commit()
    db.close()


def test_bad_entries_are_cache_misses_asked_again(server, built, tmp_path):
    path, cache, first, sent = built
    damage_entries(cache)
    stats = cli("cache", "stats", "--cache-dir", str(cache))
    assert stats.returncode == 0 and '"unusable": 3' in stats.stdout  # BLOB, NULL, 'many'
    server.reset()
    again = llm_build(server, path, tmp_path / "again", cache)
    assert again.returncode == 0, again.stderr
    assert server.stats()["chat"] == 4  # exactly the four bad entries were asked again
    # the undecodable entry is said once, naming the file, without quoting what it holds
    assert f"response cache {cache / DB} holds text that is not UTF-8" in again.stderr
    assert "harmful" not in again.stderr
    assert parquet_bytes(tmp_path / "again") == parquet_bytes(first)  # same answers, same bytes
    # the new answers replaced the bad entries: a third build sends nothing
    server.reset()
    third = llm_build(server, path, tmp_path / "third", cache)
    assert third.returncode == 0 and server.stats()["chat"] == 0
    assert '"unusable": 0' in cli("cache", "stats", "--cache-dir", str(cache)).stdout
    assert sent == 6


def test_damaged_foreign_or_unusable_cache_stops_before_any_request(server, built, tmp_path):
    path = built[0]
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    whole = (built[1] / DB).read_bytes()
    (truncated / DB).write_bytes(whole[: len(whole) // 2])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    db = sqlite3.connect(foreign / DB)
    db.execute("CREATE TABLE notes (body TEXT)")
    db.execute("INSERT INTO notes VALUES ('mine')")
    db.commit()
    db.close()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / DB).write_bytes(b"not a database at all" * 100)
    blocked = tmp_path / "a_file"
    blocked.write_text("a file where the cache folder should be")
    cases = {
        truncated: "is damaged (database disk image is malformed): move the file away",
        foreign: "is a SQLite database but not a bsafe-data cache",
        garbage: "is not a SQLite database",
    }
    server.reset()
    for folder, expected in cases.items():
        before = digest(folder)
        proc = llm_build(server, path, tmp_path / f"out_{folder.name}", folder)
        assert proc.returncode == 1
        message = one_message(proc)
        assert f"response cache {folder / DB} {expected}" in message, message
        assert digest(folder) == before and sorted(p.name for p in folder.iterdir()) == [DB]  # untouched
    proc = llm_build(server, path, tmp_path / "out_blocked", blocked)
    assert proc.returncode == 1
    assert f"response cache folder {blocked} cannot be made or used (File exists)" in one_message(proc)
    assert blocked.read_text().startswith("a file")
    assert server.stats()["chat"] == 0  # nothing was paid for


def test_cache_commands_refuse_damaged_files_and_bad_arguments(built, tmp_path):
    cache = built[1]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    whole = (cache / DB).read_bytes()
    (damaged / DB).write_bytes(whole[: len(whole) // 2])
    before = digest(damaged)
    for args in (("stats",), ("prune", "--status", "error"), ("prune", "--older-than-days", "1")):
        proc = cli("cache", *args, "--cache-dir", str(damaged))
        assert proc.returncode == 1
        assert one_message(proc).startswith(f"response cache {damaged / DB} is damaged")
    assert digest(damaged) == before

    def entries() -> int:
        db = sqlite3.connect(cache / DB)
        try:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        finally:
            db.close()

    kept = entries()
    assert kept == 6
    bad = {
        ("--older-than-days", "-5"): "--older-than-days must be a number of days >= 0, not -5.0",
        ("--older-than-days", "nan"): "not nan",
        ("--older-than-days", "-inf"): "not -inf",
        ("--older-than-days", "inf"): "not inf",
        ("--status", "bogus"): "unknown cache status(es) ['bogus']; choose from ['ok', 'refused'",
        ("--status", "error", "--status", "nope"): "unknown cache status(es) ['nope']",
    }
    for args, expected in bad.items():
        proc = cli("cache", "prune", *args, "--cache-dir", str(cache))
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in one_message(proc)
    assert entries() == kept  # -5 days would have meant "everything": nothing was deleted
    ok = cli("cache", "prune", "--older-than-days", "0", "--status", "error", "--cache-dir", str(cache))
    assert ok.returncode == 0 and "removed 0 entries" in ok.stdout and entries() == kept


# -- the library, corners a CLI cannot reach -------------------------------------------------------


def test_a_damaged_page_misses_only_its_entries_and_writes_that_fail_are_dropped(tmp_path, caplog):
    keys = [f"k{i:05d}" for i in range(3000)]
    with ResponseCache(tmp_path, flush_every=1000) as cache:
        for key in keys:
            cache.put(key, model="m", status="ok", text=key * 40)
    path = tmp_path / DB
    size = path.stat().st_size
    with path.open("r+b") as handle:  # one table page in the middle becomes noise
        handle.seek(size // 2 // 4096 * 4096)
        handle.write(os.urandom(4096))
    caplog.set_level(logging.WARNING, logger="bsafe_data.llm.cache")
    cache = ResponseCache(tmp_path)  # the cheap checks on open pass: the damage is deep inside
    try:
        found = cache.get_many(keys)
        assert len(keys) - 40 < len(found) < len(keys)  # a page holds a few entries: only they miss
        assert all(found[k].text == k * 40 for k in found)
        assert cache.get(next(k for k in keys if k not in found)) is None
        with pytest.raises(CacheError, match="is damaged"):
            cache.stats()  # the full scan names the file
        with pytest.raises(CacheError, match="is damaged"):
            cache.prune(statuses=["error"])
        with pytest.raises(ValueError, match="older-than-days"):
            cache.prune(older_than_days=-5)
        with pytest.raises(ValueError, match="unknown cache status"):
            cache.prune(statuses=iter(["error", "nope"]))
    finally:
        cache.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(path) in warnings[0] and "is damaged" in warnings[0]

    caplog.clear()
    full = tmp_path / "full"
    with ResponseCache(full, flush_every=1) as small:
        small.put("a", model="m", status="ok", text="x")
        pages = small._db.execute("PRAGMA page_count").fetchone()[0]
        small._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from now on
        for i in range(50):
            small.put(f"b{i}", model="m", status="ok", text="y" * 2000)
        stored = small._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        assert small.dropped >= 40 and small.dropped + stored == 51  # no exception, every row accounted
        assert small.get("a").text == "x"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"response cache {full / DB} cannot grow" in warnings[0]
