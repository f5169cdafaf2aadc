"""Faults are features: real builds with hostile inputs, failing endpoints, full disks and kills.

Each test runs the real CLI and checks: no traceback, a one-line message or a reason code with a
detail, a funnel that adds up, and (after the fault is gone) the same bytes as a build that never
saw it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_server import ServerProcess  # noqa: E402

from tests.conftest import REPO, source_row_key  # noqa: E402

CLI = str(Path(sys.executable).with_name("bsafe-data"))
FLAGSHIP = str(REPO / "recipes" / "bsafe_plus.yaml")
KEY = "sk-fault-key-777"
GOOD = (
    "Water the fern once a week. Keep the soil moist but not wet. Avoid direct sunlight in summer. "
    "Mist the leaves when the air is dry."
)


def cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc


def corpus(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def good_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"g{i}", "prompt": f"How do I care for fern {i}?", "response": GOOD}
        for i in range(start, start + n)
    ]


def parquet_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.glob("*/*.parquet"))}


def funnel(folder: Path) -> dict:
    f = json.loads((folder / "manifest.json").read_text())["funnel"]
    assert f["rows"] == f["kept"] + f["rejected"]
    assert sum(f["rejected_by_reason"].values()) == f["rejected"]
    return f


def rejected(folder: Path) -> dict[str, tuple[list[str], str]]:
    rows = load_dataset(str(folder), "rejected")["train"]
    return {source_row_key(r): (r["reasons"], r["detail"]) for r in rows}


# -- 1. per-row isolation ---------------------------------------------------------------------


def test_hostile_rows_are_rejected_with_code_and_detail(tmp_path):
    huge = "Fine. " * 200_000  # 1.2 M characters: more than spaCy takes (E088)
    rows = good_rows(3) + [
        {"id": "huge", "prompt": "Tell me more.", "response": huge},
        {"id": "turn", "prompt": "x" * 200_001, "response": GOOD},
    ]
    path = corpus(tmp_path / "c.jsonl", rows)
    with path.open("a") as handle:  # a lone surrogate, escaped in JSON as some exporters write it
        handle.write('{"id": "surrogate", "prompt": "hi", "response": "Broken \\ud800 text. Really."}\n')
    out = tmp_path / "out"
    proc = cli(
        "build", FLAGSHIP, "--out", str(out), "--source", str(path), "--set", "sampling.variants_per_answer=1"
    )
    assert proc.returncode == 0, proc.stderr
    found = rejected(out)
    assert found["huge"][0] == ["answer_too_long"] and "1,200,000 characters" in found["huge"][1]
    assert found["turn"][0] == ["turn_too_long"]
    assert found["surrogate"][0] == ["invalid_text"] and "surrogate" in found["surrogate"][1]
    assert funnel(out)["source_rows"] == 6
    # with the limit lifted, spaCy's own error becomes that row's reason and detail, not a crash
    out2 = tmp_path / "out2"
    proc = cli(
        "build", FLAGSHIP, "--out", str(out2), "--source", str(path),
        "--set", "sampling.variants_per_answer=1", "--set", "limits.max_answer_chars=5000000",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reasons, detail = rejected(out2)["huge"]
    assert reasons == ["row_error"] and detail.startswith("segment:") and "E088" in detail
    assert funnel(out2)["kept"] >= 1


# -- 2. control-string hygiene ----------------------------------------------------------------


def test_control_strings_in_sources_are_rejected_or_escaped(tmp_path):
    rows = good_rows(2) + [
        {"id": "ctl", "prompt": "hi", "response": "Sure. [CATEGORY Toxic][BACKTRACK_BY_12] Then rest. Done."},
        {"id": "tpl", "prompt": "hi<|im_end|>", "response": GOOD},
    ]
    path = corpus(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    args = ("--source", str(path), "--set", "sampling.variants_per_answer=3")
    assert cli("build", FLAGSHIP, "--out", str(out), *args).returncode == 0
    found = rejected(out)
    assert found["ctl"][0] == ["source_contains_control"] and "[CATEGORY Toxic]" in found["ctl"][1]
    assert found["tpl"][0] == ["source_contains_control"] and "<|im_end|>" in found["tpl"][1]
    escaped = tmp_path / "escaped"
    proc = cli("build", FLAGSHIP, "--out", str(escaped), *args, "--set", "limits.control_strings=escape")
    assert proc.returncode == 0, proc.stderr
    kept = [r for split in load_dataset(str(escaped)).values() for r in split if r["source"]["id"] == "ctl"]
    assert kept, "escaped rows are kept"
    for row in kept:  # exactly one control signal, and only in injected rows
        expected = 1 if row["kind"] == "injected" else 0
        assert row["completion"].count("[BACKTRACK_BY_") == expected
        assert "\u2060" in row["response"]


def test_a_required_rule_no_classifier_scores_is_refused(tmp_path):
    proc = cli(
        "validate", FLAGSHIP, "--set", "filters.classifiers=[{name: b, provider: builtin, targets: [part1]}]"
    )
    assert proc.returncode == 2
    assert "require_violation_flagged is on but no classifier scores violation" in proc.stderr


# -- 3. transient is never final --------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with ServerProcess(model="gen-model", api_key=KEY) as srv:
        yield srv


def llm_build(server, path: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli(
        "build", FLAGSHIP, "--out", str(out), "--source", str(path), "--cache-dir", str(cache),
        "--set", "generator.provider=openai", "--set", "generator.model=gen-model",
        "--set", f"generator.base_url={server.url}", "--set", "generator.api_key_env=FAULT_KEY",
        "--set", "generator.timeout_s=2", "--set", "generator.max_retries=1",
        "--set", "sampling.variants_per_answer=1", "--set", "sampling.clean_fraction=0", *extra,
        env={"FAULT_KEY": KEY},
    )  # fmt: skip


def test_endpoint_down_stops_and_a_rerun_completes_exactly(server, tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(30))
    reference = tmp_path / "reference"
    server.reset()
    assert llm_build(server, path, reference, tmp_path / "cache_ref").returncode == 0
    server.reset(fault="503", fault_count=0)  # every chat request fails
    out, cache = tmp_path / "out", tmp_path / "cache"
    down = llm_build(server, path, out, cache)
    assert down.returncode == 1
    message = [line for line in down.stderr.splitlines() if line.strip()]
    assert (
        "generator endpoint" in down.stderr
        and "HTTP 503" in down.stderr
        and server.url.split("/v1")[0] in down.stderr
    )
    assert len(message) <= 4  # one message (wrapped by the terminal width at most)
    assert not (out / "manifest.json").exists()
    server.reset()  # the endpoint is back
    again = llm_build(server, path, out, cache)
    assert again.returncode == 0, again.stderr
    assert parquet_bytes(out) == parquet_bytes(reference)


def test_an_endpoint_refusing_every_request_stops_the_build(server, tmp_path):
    """A 422 is final for its row (a re-run would get it again), yet an endpoint answering every
    request with one is broken: the error budget stops the build as for one that is down."""
    path = corpus(tmp_path / "c.jsonl", good_rows(30))
    server.reset(fault="422", fault_count=0)
    try:
        refused = llm_build(server, path, tmp_path / "out", tmp_path / "cache")
    finally:
        server.reset()
    assert refused.returncode == 1, refused.stderr
    assert "generator endpoint" in refused.stderr and "HTTP 422" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "out" / "manifest.json").exists()


def test_partial_failures_leave_an_incomplete_build_that_a_rerun_finishes(server, tmp_path):
    rows = good_rows(30)
    for i in (3, 17):  # both attempts of these two rows fail with HTTP 500, later ones succeed
        rows[i]["prompt"] += f" [[fault:500:2:row{i}]]"
    path = corpus(tmp_path / "c.jsonl", rows)
    server.reset()
    out, cache = tmp_path / "out", tmp_path / "cache"
    partial = llm_build(server, path, out, cache)
    assert partial.returncode == 3, partial.stderr
    assert "incomplete: 2 row(s)" in partial.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    failed = {i: r for i, r in rejected(out).items() if r[0] == ["generator_error"]}
    assert set(failed) == {"g3/v0", "g17/v0"} and all("HTTP 500" in d for _, d in failed.values())
    sent = server.stats()["chat"]
    done = llm_build(server, path, out, cache)
    assert done.returncode == 0, done.stderr
    assert server.stats()["chat"] - sent == 2  # exactly the missing rows were asked again
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    reference = tmp_path / "reference"  # a build that never saw the fault (the markers are spent)
    assert llm_build(server, path, reference, tmp_path / "cache_ref").returncode == 0
    assert parquet_bytes(out) == parquet_bytes(reference)


def test_a_retry_after_beyond_the_limit_ends_the_request_and_the_build_says_so(server, tmp_path):
    """Every request answered 429 with Retry-After: 86400. Nothing waits a day: each request fails
    as transient at once, the error budget stops the build with one message naming the wait."""
    path = corpus(tmp_path / "c.jsonl", good_rows(12))
    server.reset(fault="429", fault_count=0, retry_after="86400")
    started = time.monotonic()
    try:
        stopped = llm_build(server, path, tmp_path / "out", tmp_path / "cache")
    finally:
        server.reset(retry_after="0")
    assert time.monotonic() - started < 120
    assert stopped.returncode == 1, stopped.stderr
    assert "HTTP 429" in stopped.stderr and "generator endpoint" in stopped.stderr
    assert server.stats()["chat"] <= 12  # one request each: none was retried
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_waits_are_shown_with_what_and_how_long(server, tmp_path):
    """A server that throttles for 3 s: the build waits it out (Retry-After honoured) and prints
    which endpoint waits, how long, and why; the rows are the same as without the wait."""
    path = corpus(tmp_path / "c.jsonl", good_rows(6))
    server.reset(fault="429", fault_count=1, retry_after="3")
    try:
        waited = llm_build(server, path, tmp_path / "out", tmp_path / "cache")
    finally:
        server.reset(retry_after="0")
    assert waited.returncode == 0, waited.stderr
    log = " ".join(waited.stderr.split())
    assert "generator: waiting" in log and "HTTP 429" in log and "the server asked for 3 s" in log
    reference = tmp_path / "reference"
    assert llm_build(server, path, reference, tmp_path / "cache_ref").returncode == 0
    assert parquet_bytes(tmp_path / "out") == parquet_bytes(reference)


def test_credentials_in_an_endpoint_url_are_refused_without_printing_them(server, tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(3))
    secret = "hunter2-secret"
    url = server.url.replace("http://", f"http://alice:{secret}@")
    refused = cli("validate", FLAGSHIP, "--set", f"generator.base_url={url}")
    assert refused.returncode == 2
    assert "credentials" in refused.stderr and secret not in refused.stderr + refused.stdout
    env_build = cli(
        "build", FLAGSHIP, "--out", str(tmp_path / "env"), "--source", str(path),
        "--set", "generator.provider=openai", "--set", "generator.model=gen-model",
        env={"OPENAI_BASE_URL": url, "FAULT_KEY": KEY},
    )  # fmt: skip
    assert env_build.returncode == 1
    assert "credentials" in env_build.stderr and secret not in env_build.stderr + env_build.stdout


# -- 4. the output folder is owned ------------------------------------------------------------


def test_foreign_folders_root_and_other_recipes_are_refused(tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(5))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    proc = cli("build", FLAGSHIP, "--out", str(foreign), "--source", str(path))
    assert proc.returncode == 1 and "was not made by bsafe-data" in proc.stderr
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    assert cli("build", FLAGSHIP, "--out", "/", "--source", str(path)).returncode == 1
    out = tmp_path / "out"
    assert cli("build", FLAGSHIP, "--out", str(out), "--source", str(path)).returncode == 0
    other = cli("build", FLAGSHIP, "--out", str(out), "--source", str(path), "--set", "name=other")
    assert other.returncode == 1 and "--force" in other.stderr
    forced = cli(
        "build", FLAGSHIP, "--out", str(out), "--source", str(path), "--set", "name=other", "--force"
    )
    assert forced.returncode == 0, forced.stderr


def test_rebuild_leaves_no_stale_files(tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(40))
    out = tmp_path / "out"
    assert (
        cli(
            "build", FLAGSHIP, "--out", str(out), "--source", str(path), "--set", "split.test_fraction=0.5"
        ).returncode
        == 0
    )
    assert list((out / "data").glob("test-*"))
    proc = cli("build", FLAGSHIP, "--out", str(out), "--source", str(path), "--set", "split.test_fraction=0")
    assert proc.returncode == 0, proc.stderr
    assert not list((out / "data").glob("test-*"))
    assert cli("verify", str(out)).returncode == 0
    assert not list(tmp_path.glob(".out.bsafe-*"))  # no work, staging or lock files left beside it


def test_a_second_concurrent_build_is_refused(tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(200))
    out = tmp_path / "out"
    args = [
        CLI,
        "build",
        FLAGSHIP,
        "--out",
        str(out),
        "--source",
        str(path),
        "--set",
        "sampling.variants_per_answer=8",
    ]
    first = subprocess.Popen(args, env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / ".out.bsafe-lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
        time.sleep(0.05)
    second = cli("build", FLAGSHIP, "--out", str(out), "--source", str(path))
    assert first.wait(timeout=300) == 0
    assert second.returncode == 1 and "is being built by pid" in second.stderr
    assert cli("verify", str(out)).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_keeps_the_previous_dataset(small_disk, tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(10))
    out = small_disk / "ds"
    assert (
        cli(
            "build",
            FLAGSHIP,
            "--out",
            str(out),
            "--source",
            str(path),
            "--set",
            "sampling.variants_per_answer=1",
        ).returncode
        == 0
    )
    before = parquet_bytes(out)

    def long_answer(i: int) -> str:
        return " ".join(f"Sentence {i} {j} {random.random()}." for j in range(60))

    big = corpus(
        tmp_path / "big.jsonl",
        [{"id": f"b{i}", "prompt": "Why?", "response": long_answer(i)} for i in range(400)],
    )
    full = cli(
        "build", FLAGSHIP, "--out", str(out), "--source", str(big), "--set", "sampling.variants_per_answer=4"
    )
    assert full.returncode == 1
    assert "ENOSPC" in full.stderr or "No space left" in full.stderr
    assert parquet_bytes(out) == before
    assert cli("verify", str(out)).returncode == 0


# -- 5. integrity ------------------------------------------------------------------------------


def test_verify_catches_tampering_and_stray_files(tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(10))
    out = tmp_path / "out"
    assert cli("build", FLAGSHIP, "--out", str(out), "--source", str(path)).returncode == 0
    ok = cli("verify", str(out))
    assert ok.returncode == 0 and "files match" in ok.stdout
    (out / "id_rsa").write_text("-----BEGIN KEY-----")
    stray = cli("verify", str(out))
    assert stray.returncode == 1 and "undeclared file id_rsa" in stray.stderr
    (out / "id_rsa").unlink()
    shard = next((out / "data").glob("train-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    edited = cli("verify", str(out))
    assert edited.returncode == 1 and "changed since the build" in edited.stderr
    assert cli("verify", str(tmp_path)).returncode == 1


# -- 6. honest empty results -------------------------------------------------------------------


def test_empty_results_fail_unless_allowed(tmp_path):
    empty = corpus(tmp_path / "empty.jsonl", [])
    proc = cli("build", FLAGSHIP, "--out", str(tmp_path / "a"), "--source", str(empty))
    assert proc.returncode == 1 and "no source rows were read" in proc.stderr
    short = corpus(
        tmp_path / "short.jsonl", [{"id": f"s{i}", "prompt": "hi", "response": "Yes."} for i in range(5)]
    )
    none_kept = cli("build", FLAGSHIP, "--out", str(tmp_path / "b"), "--source", str(short))
    assert none_kept.returncode == 1 and "0 of 5 rows kept (too_few_sentences 5)" in none_kept.stderr
    allowed = cli("build", FLAGSHIP, "--out", str(tmp_path / "c"), "--source", str(short), "--allow-empty")
    assert allowed.returncode == 0, allowed.stderr
    card = (tmp_path / "c" / "README.md").read_text()
    assert "config_name: default" in card and "data/train-*.parquet" in card
    try:  # `datasets` cannot load a split with no rows: it refuses, but never serves other files
        served = load_dataset(str(tmp_path / "c"))["train"].num_rows
    except ValueError as exc:
        assert "no data" in str(exc)
    else:
        assert served == 0
    assert load_dataset(str(tmp_path / "c"), "rejected")["train"].num_rows == 5


# -- 7. inputs users actually have -------------------------------------------------------------


def test_encodings_and_message_shapes(tmp_path):
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good_rows(3)), encoding="utf-16"
    )
    out = tmp_path / "u16"
    assert cli("build", FLAGSHIP, "--out", str(out), "--source", str(utf16)).returncode == 0
    assert funnel(out)["source_rows"] == 3
    text = [{"type": "text", "text": "Hi there"}]
    image = [{"type": "image_url", "image_url": {}}]  # not text: the row is refused with a detail
    shapes = corpus(tmp_path / "shapes.jsonl", [
        {"id": "parts", "messages": [{"role": "user", "content": text},
                                     {"role": "assistant", "content": [{"type": "text", "text": GOOD}]}]},
        {"id": "mixed", "conversations": [{"role": "user", "content": "Hi"}, {"from": "gpt", "value": GOOD}]},
        {"id": "image", "messages": [{"role": "user", "content": image}, {"role": "gpt", "content": GOOD}]},
    ])  # fmt: skip
    out = tmp_path / "shapes"
    assert (
        cli(
            "build",
            FLAGSHIP,
            "--out",
            str(out),
            "--source",
            str(shapes),
            "--set",
            "sampling.variants_per_answer=1",
        ).returncode
        == 0
    )
    kept = {r["source"]["id"] for split in load_dataset(str(out)).values() for r in split}
    assert {"parts", "mixed"} <= kept
    reasons, detail = rejected(out)["image"]
    assert reasons == ["wrong_type"] and "'image_url' part" in detail
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        "".join(
            json.dumps(
                {"id": f"l{i}", "prompt": "Café?", "response": GOOD.replace("fern", "café fern")},
                ensure_ascii=False,
            )
            + "\n"
            for i in range(60)
        ).encode("cp1252")
    )
    refused = cli("build", FLAGSHIP, "--out", str(tmp_path / "latin"), "--source", str(latin))
    assert refused.returncode == 1 and "not valid UTF-8" in refused.stderr and "encoding" in refused.stderr
    fields = tmp_path / "fields.jsonl"
    fields.write_text("".join(json.dumps({"question": "q", "answer": GOOD}) + "\n" for _ in range(60)))
    proc = cli("build", FLAGSHIP, "--out", str(tmp_path / "fields"), "--source", str(fields))
    assert proc.returncode == 1 and "found columns ['answer', 'question']" in proc.stderr


def test_bad_recipes_are_one_message_and_exit_2(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nname: b\nsources: [{path: x.jsonl}]\n")
    started = time.time()
    proc = cli("validate", str(bomb), timeout=60)
    assert proc.returncode == 2 and "aliases" in proc.stderr and time.time() - started < 30
    for override, needle in [
        ("sampling.categories={Toxic: .nan}", "finite"),
        ("output.dir=out/{nope}", "output.dir"),
        ("sources.7.limit=3", "--set"),
    ]:
        bad = cli("build", FLAGSHIP, "--set", override)
        assert bad.returncode == 2 and needle in bad.stderr, (override, bad.stderr)


# -- 8. terminal safety ------------------------------------------------------------------------


def test_show_escapes_terminal_control_sequences(tmp_path):
    evil = "Water it weekly. \x1b]0;pwned\x07Keep it moist.\x1b[2J Avoid sun. Mist leaves."
    path = corpus(tmp_path / "c.jsonl", [{"id": "evil\x1b[31m", "prompt": "hi\x1b[5m", "response": evil}])
    out = tmp_path / "out"
    # the one row lands in test (a split is a hash of the source row): `show` falls back to it
    settings = ("--set", "sampling.clean_fraction=1", "--set", "split.test_fraction=0.999999")
    assert cli("build", FLAGSHIP, "--out", str(out), "--source", str(path), *settings).returncode == 0
    assert not list((out / "data").glob("train-*.parquet"))
    shown = cli("show", str(out), "--n", "5")
    assert shown.returncode == 0 and "\\x1b" in shown.stdout and "\x1b" not in shown.stdout
    assert cli("show", str(out), "--kind", "bogus").returncode == 2


# -- 9. SIGKILL anywhere ----------------------------------------------------------------------


def test_sigkill_at_random_points_then_rerun_gives_identical_output(tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(300))
    args = ["--source", str(path), "--set", "output.chunk_rows=25", "--set", "sampling.variants_per_answer=2"]
    reference = tmp_path / "reference"
    started = time.time()
    assert cli("build", FLAGSHIP, "--out", str(reference), *args).returncode == 0
    took = time.time() - started
    out = tmp_path / "out"
    rng = random.Random(5)
    for _ in range(4):  # kill points spread over set-up, chunks, the final write and the swap
        proc = subprocess.Popen(
            [CLI, "build", FLAGSHIP, "--out", str(out), *args],
            env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(0.3, took))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # whatever is in place is a complete, verifiable dataset
            assert cli("verify", str(out)).returncode == 0
    final = cli("build", FLAGSHIP, "--out", str(out), *args)
    assert final.returncode == 0, final.stderr
    assert parquet_bytes(out) == parquet_bytes(reference)
    ids = [r["id"] for split in load_dataset(str(out)).values() for r in split]
    assert len(ids) == len(set(ids))
    shutil.rmtree(out)
