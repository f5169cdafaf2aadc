"""DeRTa (recipes/derta.yaml) built offline through the real CLI, on the bundled harmful set.

Checks the harmful-prefix length k (uniform in primary-tokenizer tokens, clean cuts, the k = 0 share),
the RTO labels with both tokenizer families, the authors' export layout and ``plan``. Harmful text
is never printed: assertion messages carry ids and numbers only.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset
from transformers import AutoTokenizer

from bsafe_data import end_of_turn
from bsafe_data.methods.derta import export_derta, prefix_labels, rto_labels
from bsafe_data.registry import load_recipe
from tests.conftest import REPO, TOKENIZER_DIRS, content_label

CLI = str(Path(sys.executable).with_name("bsafe-data"))
RECIPE = REPO / "recipes" / "derta.yaml"
VARIANTS = 4  # harmful_prefix rows per harmful prompt: 480 draws of k


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600, env=os.environ, cwd=REPO)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("derta") / "derta"
    proc = run_cli("build", str(RECIPE), "--out", str(out), "--set", f"derta.prefix_variants={VARIANTS}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def rows(built, tmp_path_factory) -> list[dict]:
    cache = tmp_path_factory.mktemp("derta_datasets_cache")
    ds = load_dataset(str(built), cache_dir=str(cache))
    return [row for split in ds.values() for row in split]


def fresh(name: str):
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIRS[name]))


def harmful_of(rows: list[dict]) -> dict[str, str]:
    """Harmful answer by source id, from the RTO rows (they hold the full answer)."""
    return {r["source"]["id"]: r["injection"]["violation"] for r in rows if r["kind"] == "refusal_token"}


def k_of(tok, harmful: str, prefix: str) -> tuple[int, int]:
    """Which cut of the harmful answer (primary tokens) a stored prefix is; asserts it is clean."""
    ids = tok.encode(harmful, add_special_tokens=False)
    if not prefix:
        return 0, len(ids)
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], clean_up_tokenization_spaces=False)
        if text == prefix:
            assert harmful.startswith(text) and "\ufffd" not in text
            return k, len(ids)
    raise AssertionError("a stored prefix is not a token cut of its harmful answer")


def ks_uniform(values: list[float]) -> float:
    """Kolmogorov-Smirnov statistic of ``values`` against Uniform(0, 1)."""
    xs = sorted(values)
    n = len(xs)
    return max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))


def jittered(draws: list[tuple[int, int]], seed: int = 0) -> list[float]:
    """k uniform on {1..n-1} → (k - 1 + U) / (n - 1) is exactly Uniform(0, 1)."""
    rng = random.Random(seed)
    return [(k - 1 + rng.random()) / (n - 1) for k, n in draws]


def test_offline_build_through_cli(built, rows):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["method"] == "derta"
    funnel = manifest["funnel"]
    assert funnel["source_rows"] == 240 and funnel["rows"] == funnel["kept"] + funnel["rejected"]
    kinds = {
        k: sum(1 for r in rows if r["kind"] == k) for k in ("harmful_prefix", "refusal_token", "helpful")
    }
    assert kinds["harmful_prefix"] >= 0.9 * 120 * VARIANTS, kinds
    assert kinds["refusal_token"] >= 108 and kinds["helpful"] >= 108, kinds
    assert run_cli("verify", str(built)).returncode == 0
    card = (built / "README.md").read_text()
    assert "DeRTa" in card and "rto_labels" in card and "One real row" in card
    for row in rows:
        if row["kind"] == "harmful_prefix":  # loss on the refusal only, the prefix sits in the prompt
            prefix = row["injection"]["violation"] if row["injection"] else ""
            assert row["prompt"].endswith(prefix) and row["completion"].startswith(row["response"])
            assert [s["loss"] for s in row["segments"]] == ([False] if prefix else []) + [True]
        elif row["kind"] == "refusal_token":
            assert row["completion"] == "" and row["prompt"].endswith(row["injection"]["violation"])


def test_k_is_uniform_in_primary_tokens_with_the_recipe_zero_share(rows):
    tok = fresh("qwen2.5")  # the recipe's primary tokenizer
    harmful = harmful_of(rows)
    draws = []
    for row in rows:
        if row["kind"] == "harmful_prefix" and row["source"]["id"] in harmful:
            prefix = row["injection"]["violation"] if row["injection"] else ""
            draws.append(k_of(tok, harmful[row["source"]["id"]], prefix))
    assert len(draws) > 300
    zero_share = sum(1 for k, _ in draws if k == 0) / len(draws)
    recipe = load_recipe(RECIPE)
    assert abs(zero_share - recipe.derta.zero_prefix_fraction) <= 0.03, zero_share
    cuts = [(k, n) for k, n in draws if k > 0]
    assert all(1 <= k <= n - 1 for k, n in cuts)
    critical = 1.63 / math.sqrt(len(cuts))  # KS, alpha = 0.01
    statistic = ks_uniform(jittered(cuts))
    assert statistic < critical, (statistic, critical, len(cuts))
    # the check can fail: the same cuts squeezed towards the start are far from uniform
    squeezed = [(max(1, k // 3), n) for k, n in cuts]
    assert ks_uniform(jittered(squeezed)) > critical


@pytest.mark.parametrize("family", ["qwen2.5", "phi-3-mini"])
def test_rto_labels_are_the_transition_token_on_every_harmful_position(rows, family):
    tok = fresh(family)
    transition = tok.encode("Sorry", add_special_tokens=False)[0]
    rto = [r for r in rows if r["kind"] == "refusal_token"]
    assert len(rto) >= 100
    from bsafe_data.label import chat_frame

    for row in rto:
        enc = rto_labels(row, tok)
        head, _ = chat_frame(tok, row["context"])
        harmful = row["injection"]["violation"]
        full = tok(head + harmful, return_offsets_mapping=True)
        assert enc["input_ids"] == full["input_ids"]
        # independent of rto_labels: a token is harmful when its characters start after the head
        inside = [start >= len(head) and end > start for start, end in full["offset_mapping"]]
        want = [transition if h else -100 for h in inside]
        assert enc["labels"] == want, row["id"]
        assert sum(inside) >= 10
        positions = [i for i, h in enumerate(inside) if h]
        assert tok.decode(enc["input_ids"][positions[0] :]).strip() == harmful.strip(), row["id"]
    # keep_fraction: the authors drop ~5% of the positions
    kept = total = 0
    for row in rto:
        labels = rto_labels(row, tok, keep_fraction=0.95, seed=1)["labels"]
        full = rto_labels(row, tok)["labels"]
        total += sum(1 for x in full if x != -100)
        kept += sum(1 for x in labels if x != -100)
        assert all(x in (-100, transition) for x in labels)
    assert 0.92 <= kept / total <= 0.98, kept / total


@pytest.mark.parametrize("family", ["qwen2.5", "phi-3-mini"])
def test_prefix_rows_train_on_the_refusal_only(rows, family):
    tok = fresh(family)
    eot = end_of_turn(tok)
    checked = 0
    for row in rows:
        if row["kind"] == "refusal_token":
            continue
        enc = prefix_labels(row, tok)
        start = next(i for i, x in enumerate(enc["labels"]) if x != -100)
        assert enc["labels"][start:] == enc["input_ids"][start:], row["id"]
        assert tok.decode(enc["input_ids"][start:]) == row["response"] + eot, row["id"]
        if row["injection"]:
            assert tok.decode(enc["input_ids"][:start]).endswith(row["injection"]["violation"]), row["id"]
            checked += 1
    assert checked >= 200


def test_export_in_the_authors_layout(built, rows, tmp_path):
    path = tmp_path / "llama_derta.json"
    n = export_derta(built, path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train_ids = set(load_dataset(str(built), split="train")["id"])
    train = [r for r in rows if r["id"] in train_ids]
    assert n == len(records) == len(train)
    assert all(set(r) == {"prefix", "text", "safe"} for r in records)
    assert all(r["prefix"].startswith("[INST] ") and r["text"].endswith("<|end_of_text|>") for r in records)
    assert sum(r["safe"] == "true" for r in records) == sum(r["kind"] == "refusal_token" for r in train)
    assert {r["safe"] for r in records} == {"true", "false"}


def test_plan_works():
    proc = run_cli("plan", str(RECIPE))
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- refusals written by the generator (generator.provider: openai, the local test servers) --------

KEY = "sk-test-derta-7171"
BLAND = "Here is a continuation without any of the requested tags."  # the test server's `notags` answer


@pytest.fixture(scope="module")
def servers():
    from tests.guard_server import GuardServer
    from tests.openai_server import ServerProcess

    with ServerProcess(model="gen-model", api_key=KEY) as gen, GuardServer() as guard:
        yield gen, guard


def no_refusal_corpus(path: Path, n: int, markers: dict[int, str]) -> Path:
    """The first ``n`` bundled harmful rows without their refusal column; ``markers`` are appended
    to the prompt of row i (the test server reads them)."""
    lines = (REPO / "bsafe_data" / "data" / "harmful" / "harmful_chat.jsonl").read_text().splitlines()[:n]
    with path.open("w") as handle:
        for i, line in enumerate(lines):
            row = json.loads(line)
            prompt = f"{row['prompt']} {markers.get(i, '')}".strip()
            record = {"id": row["id"], "prompt": prompt, "harmful_response": row["harmful_response"]}
            handle.write(json.dumps(record) + "\n")
    return path


def llm_build(
    servers, corpus: Path, out: Path, cache: Path, offline: bool = False
) -> subprocess.CompletedProcess:
    """``recipes/derta.yaml`` on ``corpus`` (+3 helpful chats), the generator and a llama_guard
    classifier on the test servers."""
    import yaml

    gen, guard = servers
    data = yaml.safe_load(RECIPE.read_text())
    data["sources"] = [
        {"path": str(corpus), "mapping": {"prompt": "prompt", "response": "harmful_response"}},
        {"path": "builtin:everyday_chat", "limit": 3},
    ]
    data["derta"]["harmful_source"] = str(corpus)
    if not offline:  # offline: the recipe's own builtin generator and classifier
        data["generator"] = {"provider": "openai", "model": "gen-model", "base_url": gen.url,
                             "api_key_env": "BSAFE_TEST_KEY", "timeout_s": 2, "max_retries": 1}  # fmt: skip
        data["filters"]["classifiers"] = [
            {"name": "builtin", "provider": "builtin", "threshold": 0.5},
            {"name": "guard", "provider": "llama_guard", "model": "llama-guard-3", "base_url": guard.url},
        ]
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(yaml.safe_dump(data))
    args = [CLI, "build", str(recipe), "--out", str(out), "--cache-dir", str(cache)]
    env = {**os.environ, "BSAFE_TEST_KEY": KEY}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert KEY not in proc.stdout + proc.stderr
    return proc


def parquet_rows(out: Path) -> tuple[list[dict], list[dict]]:
    """(kept, rejected) rows of a build folder, read straight from its parquet files."""
    import pyarrow.parquet as pq

    kept = [r for f in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    rejected = [r for f in sorted((out / "rejected").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return kept, rejected


def parquet_bytes(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*.parquet"))}


def test_generator_writes_missing_refusals_caches_them_and_a_fault_is_transient(servers, tmp_path):
    gen, guard = servers
    gen.reset()
    guard.reset()
    n, bland = 6, {0, 3}  # rows 0 and 3 get a bland refusal (kept); the others an insult (rejected)
    corpus = no_refusal_corpus(tmp_path / "c.jsonl", n, {i: "[[fault:notags:0]]" for i in bland})
    ids = [json.loads(line)["id"] for line in corpus.read_text().splitlines()]
    cache = tmp_path / "cache"

    first = llm_build(servers, corpus, tmp_path / "a", cache)
    assert first.returncode == 0, first.stderr[-2000:]
    sent, judged = gen.stats()["chat"], guard.requests()
    assert sent == n  # exactly one refusal request per harmful row without a refusal
    assert judged > 0
    # the manifest counts the requests of every client, not only the (unused) violation generator
    clients = json.loads((tmp_path / "a" / "manifest.json").read_text())["usage_by_client"]
    assert clients["companion_writer"]["requests"] == sent and clients["generator"].get("requests", 0) == 0
    assert clients["classifier:guard"]["requests"] == judged
    kept, rejected = parquet_rows(tmp_path / "a")
    harmful_kept = [r for r in kept if r["kind"] != "helpful"]
    assert {r["source"]["id"] for r in harmful_kept} == {ids[i] for i in bland}
    assert {r["kind"] for r in harmful_kept} == {"harmful_prefix", "refusal_token"}
    for row in harmful_kept:
        assert row["response"] == BLAND
        assert row["generator"]["model"] == "gen-model"
        assert row["generator"]["template"] == "derta/refusal/1"
        if row["kind"] == "harmful_prefix":
            assert row["completion"].startswith(BLAND)
    assert all("missing_companion" not in r["reasons"] for r in rejected)
    # the insulting refusals were written, then failed the trained-answer safety rule
    written_rejected = {r["source"]["id"] for r in rejected if r["kind"] != "helpful"}
    assert written_rejected == {ids[i] for i in range(n) if i not in bland}
    assert any(r["kind"] == "helpful" for r in kept)

    again = llm_build(servers, corpus, tmp_path / "b", cache)
    assert again.returncode == 0, again.stderr[-2000:]
    assert gen.stats()["chat"] == sent and guard.requests() == judged  # all from the cache
    assert parquet_bytes(tmp_path / "b") == parquet_bytes(tmp_path / "a")

    hit = 1  # its refusal request always fails
    no_refusal_corpus(corpus, n, {**{i: "[[fault:notags:0]]" for i in bland}, hit: "[[fault:503:0]]"})
    broken = llm_build(servers, corpus, tmp_path / "c", cache)
    assert broken.returncode == 3, broken.stderr[-2000:]  # built, incomplete: a re-run retries the row
    _, rejected = parquet_rows(tmp_path / "c")
    reasons = {r["id"]: r["reasons"] for r in rejected if r["source"]["id"] == ids[hit]}
    assert len(reasons) == 2 and all(v == ["generator_error"] for v in reasons.values())  # v0 and rto
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["complete"] is False


def test_offline_a_missing_refusal_is_missing_companion_and_nothing_is_sent(servers, tmp_path):
    gen, guard = servers
    gen.reset()
    guard.reset()
    corpus = no_refusal_corpus(tmp_path / "c.jsonl", 4, {})
    proc = llm_build(servers, corpus, tmp_path / "a", tmp_path / "cache", offline=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert gen.stats()["chat"] == 0 and guard.requests() == 0
    kept, rejected = parquet_rows(tmp_path / "a")
    assert all(r["kind"] == "helpful" for r in kept)
    harmful = [r for r in rejected if r["source"]["dataset"] == content_label(corpus)]
    assert len(harmful) == 4 and all(r["reasons"] == ["missing_companion"] for r in harmful)
