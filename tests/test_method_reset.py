"""Reset backtracking (recipes/reset.yaml) built offline through the real CLI, on the bundled harmful set.

Checks ``[RESET]`` is one token for both families once added, that ``bsafe_data.tokenize`` trains on
exactly ``[RESET]`` ⊕ the safe answer (⊕ the end-of-turn token), the ``preference`` config (loads with
``load_dataset(folder, "preference")``, TRL's DPOTrainer prepares it on a tiny random Llama, CPU),
refilter rebuilding it, and ``plan``. Harmful text is never printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset
from transformers import AutoTokenizer

from bsafe_data import add_control_tokens, end_of_turn, tokenize
from bsafe_data.label import chat_frame
from tests.conftest import REPO, TOKENIZER_DIRS, content_label

CLI = str(Path(sys.executable).with_name("bsafe-data"))
RECIPE = REPO / "recipes" / "reset.yaml"
RESET = "[RESET]"
FAMILIES = ["qwen2.5", "phi-3-mini"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600, env=os.environ, cwd=REPO)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reset") / "reset"
    proc = run_cli("build", str(RECIPE), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("reset_datasets_cache"))


@pytest.fixture(scope="module")
def rows(built, cache) -> list[dict]:
    ds = load_dataset(str(built), cache_dir=cache)
    return [row for split in ds.values() for row in split]


def with_reset(name: str):
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIRS[name]))
    add_control_tokens(tok, [RESET])
    return tok


def test_offline_build_through_cli(built, rows):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["method"] == "reset" and manifest["control_tokens"] == [RESET]
    assert manifest["counts"]["preference"] == manifest["counts"]["default"]
    kinds = {k: sum(1 for r in rows if r["kind"] == k) for k in ("injected", "clean")}
    assert kinds["injected"] >= 108 and kinds["clean"] >= 54, kinds
    assert run_cli("verify", str(built)).returncode == 0
    card = (built / "README.md").read_text()
    assert "config_name: preference" in card and "DPOTrainer" in card and "One real row" in card
    for row in rows:
        if row["kind"] == "injected":
            assert [s["kind"] for s in row["segments"]] == ["violation", "control", "continuation"]
            assert [s["loss"] for s in row["segments"]] == [False, True, True]
            assert row["completion"].startswith(RESET + row["response"])
            assert {b["tokenizer"] for b in row["backtrack"]} == {"qwen2.5", "phi-3-mini"}
            assert row["unsafe_continuation"]  # the cut is inside the unsafe answer


@pytest.mark.parametrize("family", FAMILIES)
def test_reset_is_one_token_after_adding_it(family):
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIRS[family]))
    assert len(tok.encode(RESET, add_special_tokens=False)) > 1  # not in the vocabulary before
    tok = with_reset(family)
    ids = tok.encode("unsafe start" + RESET + "Safe answer.", add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids(RESET)) == 1
    assert len(tok.encode(RESET, add_special_tokens=False)) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_covers_exactly_reset_and_the_safe_answer(rows, family):
    tok = with_reset(family)
    eot = end_of_turn(tok)
    reset_id = tok.convert_tokens_to_ids(RESET)
    checked = 0
    for row in rows:
        enc = tokenize(row, tok, control_format=RESET)
        labels, ids = enc["labels"], enc["input_ids"]
        start = next(i for i, x in enumerate(labels) if x != -100)
        assert all(x != -100 for x in labels[start:]), row["id"]
        trained = tok.decode(ids[start:])
        head, _ = chat_frame(tok, row["context"])
        assert tok.decode(ids[:start]).startswith(head.split("\n")[0]), row["id"]
        if row["kind"] == "injected":
            assert ids[start] == reset_id, row["id"]
            assert trained == RESET + row["response"] + eot, row["id"]
            untrained = tok.decode(ids[:start], skip_special_tokens=False)
            assert untrained.endswith(row["injection"]["violation"]), row["id"]
            checked += 1
        else:
            assert reset_id not in ids and trained == row["response"] + eot, row["id"]
    assert checked >= 100


def test_preference_config_loads_and_pairs_match(built, rows, cache):
    pref = load_dataset(str(built), "preference", cache_dir=cache)
    assert set(pref) == {"train", "test"}
    by_id = {r["id"]: r for r in rows}
    pairs = [p for split in pref.values() for p in split]
    assert len(pairs) == len(rows)
    for pair in pairs:
        row = by_id[pair["row_id"]]
        assert pair["prompt"] == row["prompt"] and pair["chosen"] == row["completion"]
        if pair["kind"] == "unsafe":
            assert pair["chosen"].startswith(RESET) and not pair["rejected"].startswith(RESET)
            assert pair["rejected"].startswith(row["unsafe_continuation"])
        else:
            assert pair["rejected"] == RESET + pair["chosen"]
    train_ids = {r["id"] for r in load_dataset(str(built), split="train", cache_dir=cache)}
    assert {p["row_id"] for p in pref["train"]} == train_ids  # same split as the row


def test_trl_dpo_trainer_prepares_the_preference_config(built, cache, tmp_path):
    torch = pytest.importorskip("torch", reason="needs the [train] extra (torch, trl)")
    pytest.importorskip("trl", reason="needs the [train] extra (torch, trl)")
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok = with_reset("qwen2.5")
    pref = load_dataset(str(built), "preference", split="train", cache_dir=cache).select(range(16))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        max_length=None,
        seed=0,
    )
    model = LlamaForCausalLM(config)
    ref_model = LlamaForCausalLM(config)  # a model built from a config has no Hub id to reload from
    ref_model.load_state_dict(model.state_dict())
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=pref, processing_class=tok
    )
    prepared = trainer.train_dataset
    assert len(prepared) == 16
    columns = set(prepared.column_names)
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns, columns
    reset_id = tok.convert_tokens_to_ids(RESET)
    first = prepared[0]
    assert tok.decode(first["prompt_ids"]) == pref[0]["prompt"]
    unsafe = [p for p, src in zip(prepared, pref, strict=True) if src["kind"] == "unsafe"]
    assert unsafe and all(p["chosen_ids"][0] == reset_id for p in unsafe)
    trainer.train()  # one optimizer step on the pairs


def test_refilter_rebuilds_the_preference_config(built, tmp_path):
    from bsafe_data.refilter import refilter

    folder = tmp_path / "reset"
    shutil.copytree(built, folder)
    result = refilter(folder, ["filters.classifiers.0.threshold=0.0"])  # every answer is now unsafe
    assert result.after["kept"] == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sum(manifest["counts"]["preference"].values()) == 0
    assert run_cli("verify", str(folder)).returncode == 0


def test_plan_works():
    proc = run_cli("plan", str(RECIPE))
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- safe answers written by the generator (generator.provider: openai, the local test servers) ----

KEY = "sk-test-reset-7272"
BLAND = "Here is a continuation without any of the requested tags."  # the test server's `notags` answer


@pytest.fixture(scope="module")
def servers():
    from tests.guard_server import GuardServer
    from tests.openai_server import ServerProcess

    with ServerProcess(model="gen-model", api_key=KEY) as gen, GuardServer() as guard:
        yield gen, guard


def no_safe_corpus(path: Path, n: int, markers: dict[int, str]) -> Path:
    """The first ``n`` bundled harmful rows without their safe answers; ``markers`` are appended to
    the prompt of row i (the test server reads them)."""
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
    """``recipes/reset.yaml`` on ``corpus`` (+3 safe chats), the generator and a llama_guard
    classifier on the test servers."""
    import yaml

    gen, guard = servers
    data = yaml.safe_load(RECIPE.read_text())
    data["sources"] = [
        {"path": str(corpus), "mapping": {"prompt": "prompt", "response": "harmful_response"}},
        {"path": "builtin:everyday_chat", "limit": 3},
    ]
    data["reset"]["harmful_source"] = str(corpus)
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


def parquet_rows(out: Path, config: str = "data") -> list[dict]:
    """Rows of one config folder of a build (``data``, ``rejected``, ``preference``), from parquet."""
    import pyarrow.parquet as pq

    return [r for f in sorted((out / config).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def parquet_bytes(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*.parquet"))}


def test_generator_writes_missing_safe_answers_caches_them_and_a_fault_is_transient(servers, tmp_path):
    gen, guard = servers
    gen.reset()
    guard.reset()
    n, bland = 6, {1, 4}  # rows 1 and 4 get a bland safe answer (kept); the others an insult (rejected)
    corpus = no_safe_corpus(tmp_path / "c.jsonl", n, {i: "[[fault:notags:0]]" for i in bland})
    ids = [json.loads(line)["id"] for line in corpus.read_text().splitlines()]
    cache = tmp_path / "cache"

    first = llm_build(servers, corpus, tmp_path / "a", cache)
    assert first.returncode == 0, first.stderr[-2000:]
    sent, judged = gen.stats()["chat"], guard.requests()
    assert sent == n  # exactly one safe-answer request per harmful row without one
    assert judged > 0
    kept, rejected = parquet_rows(tmp_path / "a"), parquet_rows(tmp_path / "a", "rejected")
    injected = [r for r in kept if r["kind"] == "injected"]
    assert sorted(r["source"]["id"] for r in injected) == sorted(ids[i] for i in bland)
    for row in injected:
        assert row["response"] == BLAND
        assert row["completion"].startswith(RESET + BLAND)
        assert row["generator"]["model"] == "gen-model"
        assert row["generator"]["template"] == "reset/safe_response/1"
    assert all("missing_companion" not in r["reasons"] for r in rejected)
    assert {r["source"]["id"] for r in rejected if r["kind"] == "injected"} == {
        ids[i] for i in range(n) if i not in bland
    }
    pairs = {p["row_id"]: p for p in parquet_rows(tmp_path / "a", "preference")}
    assert all(pairs[r["id"]]["chosen"].startswith(RESET + BLAND) for r in injected)

    again = llm_build(servers, corpus, tmp_path / "b", cache)
    assert again.returncode == 0, again.stderr[-2000:]
    assert gen.stats()["chat"] == sent and guard.requests() == judged  # all from the cache
    assert parquet_bytes(tmp_path / "b") == parquet_bytes(tmp_path / "a")

    hit = 2  # its safe-answer request always fails
    no_safe_corpus(corpus, n, {**{i: "[[fault:notags:0]]" for i in bland}, hit: "[[fault:503:0]]"})
    broken = llm_build(servers, corpus, tmp_path / "c", cache)
    assert broken.returncode == 3, broken.stderr[-2000:]  # built, incomplete: a re-run retries the row
    rejected = parquet_rows(tmp_path / "c", "rejected")
    reasons = [r["reasons"] for r in rejected if r["source"]["id"] == ids[hit]]
    assert reasons == [["generator_error"]]
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["complete"] is False


def test_offline_a_missing_safe_answer_is_missing_companion_and_nothing_is_sent(servers, tmp_path):
    gen, guard = servers
    gen.reset()
    guard.reset()
    corpus = no_safe_corpus(tmp_path / "c.jsonl", 4, {})
    proc = llm_build(servers, corpus, tmp_path / "a", tmp_path / "cache", offline=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert gen.stats()["chat"] == 0 and guard.requests() == 0
    assert all(r["kind"] == "clean" for r in parquet_rows(tmp_path / "a"))
    rejected = parquet_rows(tmp_path / "a", "rejected")
    harmful = [r for r in rejected if r["source"]["dataset"] == content_label(corpus)]
    assert len(harmful) == 4 and all(r["reasons"] == ["missing_companion"] for r in harmful)
