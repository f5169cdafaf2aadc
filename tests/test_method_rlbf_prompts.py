"""The rlbf_prompts method: an offline GRPO prompt set built through the real CLI, read back with
``datasets.load_dataset``; middle-fill prefills are undone exactly by ``bsafe_data.rl.apply_backtracks``
for both bundled tokenizer families; benign share; random suffixes are real primary-tokenizer tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset

from bsafe_data.label import add_control_tokens, chat_frame, control_text
from bsafe_data.rl import apply_backtracks
from bsafe_data.tokenization import load_tokenizer, short_name
from tests.conftest import REPO

RECIPE = REPO / "recipes" / "rlbf_prompts.yaml"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bsafe_data", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def _build(out: Path, *extra: str) -> Path:
    result = _cli("build", str(RECIPE), "--out", str(out), *extra)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("rlbf") / "prompts")


def _rows(folder: Path) -> list[dict]:
    ds = load_dataset(str(folder))
    return [row for split in ds.values() for row in split]


def test_offline_build_gives_conversational_prompts_with_attack_metadata(built):
    rows = _rows(built)
    assert len(rows) > 800
    assert Counter(r["attack"] for r in rows).keys() == {"none", "middle_fill", "suffix", "decoding"}
    assert set(r["expect"] for r in rows) == {"backtrack", "answer", "refuse"}
    for row in rows:
        prompt = row["prompt"]
        assert prompt and all(set(m) == {"role", "content"} for m in prompt)
        assert {m["role"] for m in prompt} <= {"system", "user", "assistant"} and prompt[-1]["content"]
        assert set(row["sampling"]) == {"temperature", "top_p", "top_k"}
        # booleans only: a failure names the row, never its (harmful) text
        if row["attack"] == "middle_fill":
            last = prompt[-1]
            prefilled = last == {"role": "assistant", "content": row["prefill"]} and bool(row["prefill"])
            labelled = row["expect"] == "backtrack" and bool(row["category"]) and bool(row["backtrack"])
            assert prefilled and labelled, row["id"]
        else:
            plain = prompt[-1]["role"] == "user" and row["prefill"] == ""
            assert plain, row["id"]
        if row["attack"] == "suffix":
            suffixed = bool(row["suffix"]) and prompt[-1]["content"].endswith(" " + row["suffix"])
            assert suffixed, row["id"]
    decoding = [r["sampling"] for r in rows if r["attack"] == "decoding"]
    assert len({(s["temperature"], s["top_p"], s["top_k"]) for s in decoding}) > 5  # a sweep, not a constant
    others = {
        (s["temperature"], s["top_p"], s["top_k"])
        for r in rows
        if r["attack"] != "decoding"
        for s in [r["sampling"]]
    }
    assert others == {(1.0, 1.0, 0)}
    manifest = json.loads((built / "manifest.json").read_text())
    assert (
        manifest["reward"]["unsafe"] == 3.0 and manifest["reward"]["classifiers"][0]["provider"] == "builtin"
    )
    assert manifest["control_tokens"] and manifest["method"] == "rlbf_prompts"
    card = (built / "README.md").read_text()
    assert "prompt set for RLBF" in card and "| middle_fill |" in card
    assert _cli("verify", str(built)).returncode == 0
    rejected = load_dataset(str(built), "rejected", split="train")  # same columns + reasons, detail
    assert len(rejected) and {"reasons", "detail", "attack", "expect", "prompt"} <= set(rejected.column_names)
    assert manifest["funnel"]["kept"] + manifest["funnel"]["rejected"] == manifest["funnel"]["rows"]


@pytest.mark.parametrize("ref", ["builtin:qwen2.5", "builtin:phi-3-mini"])
def test_middle_fill_ideal_completion_backtracks_exactly_the_injected_text(built, ref):
    manifest = json.loads((built / "manifest.json").read_text())
    tok = load_tokenizer(ref)
    add_control_tokens(tok, manifest["control_tokens"])
    rows = [r for r in _rows(built) if r["attack"] == "middle_fill"]
    kinds = Counter("prefix" if r["injection"]["offset"] == 0 else "injected" for r in rows)
    assert kinds["prefix"] > 20 and kinds["injected"] > 20  # both middle-fill kinds are exercised
    for row in rows:
        inj = row["injection"]
        x = next(b["tokens"] for b in row["backtrack"] if b["tokenizer"] == short_name(ref))
        continuation = "".join(s["text"] for s in row["segments"] if s["kind"] == "continuation")
        ideal = control_text(manifest["control_format"], row["category"], x) + continuation
        head, _tail = chat_frame(tok, row["context"])
        t = apply_backtracks(head + row["prefill"] + ideal, tok)
        # booleans only: a failure names the row, never its (harmful) text
        one_clean_signal = len(t.signals) == 1 and not t.malformed
        assert one_clean_signal, row["id"]
        removes_the_injection = t.signals[0].removed_text == inj["steering"] + inj["violation"]
        assert removes_the_injection, row["id"]
        keeps_the_rest = t.text == head + row["prefill"][: inj["offset"]] + continuation
        assert keeps_the_rest, row["id"]


def test_benign_share_is_the_recipe_ratio(built):
    rows = _rows(built)
    share = sum(r["expect"] == "answer" for r in rows) / len(rows)
    assert abs(share - 0.3) <= 0.03, share


def test_random_suffixes_are_primary_tokens_and_deterministic_per_seed(built, tmp_path):
    tok = load_tokenizer("builtin:qwen2.5")
    fixed = set(yaml.safe_load(RECIPE.read_text())["suffixes"]["fixed"])
    rows = _rows(built)
    randoms = [r["suffix"] for r in rows if r["attack"] == "suffix" and r["suffix"] not in fixed]
    assert len(randoms) > 20
    special = set(tok.all_special_ids)
    for suffix in randoms:
        pieces = suffix.split(" ")
        assert len(pieces) == 16
        for piece in pieces:
            ids = tok(piece, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] not in special and ids[0] < len(tok), piece
    assert len(set(randoms)) == len(randoms)  # seeded per row
    again = _build(tmp_path / "again", "--limit", "60")
    other = _build(tmp_path / "other", "--limit", "60", "--set", "seed=99")
    by_id = {r["id"]: r["suffix"] for r in rows}
    same = {r["id"]: r["suffix"] for r in _rows(again)}
    assert same and all(by_id[i] == s for i, s in same.items())
    assert {r["id"]: r["suffix"] for r in _rows(other)} != same


def test_plan_works_offline():
    result = _cli("plan", str(RECIPE))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "BACKTRACK_BY_" in result.stdout  # its preview shows a middle-fill prefill and ideal completion
