"""End-to-end: the flagship recipe builds offline into a folder that `load_dataset` reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from bsafe_data import add_control_tokens, render, tokenize
from bsafe_data.label import chat_frame
from bsafe_data.pipeline import build
from bsafe_data.registry import load_recipe
from bsafe_data.stages.sample import fifths_histogram
from bsafe_data.stats import write_score_plots
from tests.conftest import REPO, source_row_key

CLI = str(Path(sys.executable).with_name("bsafe-data"))
FLAGSHIP = REPO / "recipes" / "bsafe_plus.yaml"


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the console script with the test environment (offline)."""
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=timeout, env=os.environ, **kwargs
    )


@pytest.fixture(scope="module")
def flagship(tmp_path_factory) -> Path:
    """The flagship recipe built once with the README's command (bundled corpus, 5 variants)."""
    out = tmp_path_factory.mktemp("flagship") / "bsafe_plus"
    proc = run_cli("build", str(FLAGSHIP), "--out", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


@pytest.fixture(scope="module")
def loaded(flagship):
    return load_dataset(str(flagship))


def test_load_dataset_reads_both_configs(flagship, loaded):
    manifest = json.loads((flagship / "manifest.json").read_text())
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].num_rows == manifest["counts"]["default"]["train"]
    assert loaded["test"].num_rows == manifest["counts"]["default"]["test"]
    rejected = load_dataset(str(flagship), "rejected")["train"]
    assert rejected.num_rows == manifest["funnel"]["rejected"]
    assert all(r for r in rejected["reasons"])
    # no answer leaks across splits
    train_sources = {s["id"] for s in loaded["train"]["source"]}
    test_sources = {s["id"] for s in loaded["test"]["source"]}
    assert train_sources and test_sources and not train_sources & test_sources


def test_completion_starts_with_control_only_for_injected(loaded):
    rows = list(loaded["train"]) + list(loaded["test"])
    kinds = {r["kind"] for r in rows}
    assert kinds == {"injected", "clean"}
    for row in rows:
        if row["kind"] == "injected":
            x = row["backtrack"][0]["tokens"]
            control = f"[CATEGORY {row['injection']['category']}][BACKTRACK_BY_{x}]"
            assert row["completion"].startswith(control), row["id"]
            assert [s["kind"] for s in row["segments"] if s["loss"]] == ["control", "continuation"]
            assert "".join(s["text"] for s in row["segments"]) == (
                row["response"][: row["injection"]["offset"]]
                + row["injection"]["steering"]
                + row["injection"]["violation"]
                + control
                + row["response"][row["injection"]["offset"] :]
            )
        else:
            assert "[BACKTRACK_BY_" not in row["completion"] and "[CATEGORY" not in row["completion"]
            assert row["completion"].startswith(row["response"])
            assert row["injection"] is None


def test_token_invariant_every_kept_row_two_tokenizer_families(loaded, tokenizers):
    """encode(before) is a prefix of encode(with violation) and X is the difference, independently checked."""
    checked = 0
    for row in list(loaded["train"]) + list(loaded["test"]):
        if row["kind"] != "injected":
            continue
        xs = {b["tokenizer"]: b["tokens"] for b in row["backtrack"]}
        assert set(xs) == {"qwen2.5", "phi-3-mini"}
        inj = row["injection"]
        part1 = row["response"][: inj["offset"]]
        for name, tok in tokenizers.items():
            head, _ = chat_frame(tok, row["context"])
            before = tok(head + part1, add_special_tokens=False)["input_ids"]
            after = tok(head + part1 + inj["steering"] + inj["violation"], add_special_tokens=False)[
                "input_ids"
            ]
            assert after[: len(before)] == before, (row["id"], name)
            assert xs[name] == len(after) - len(before), (row["id"], name)
            checked += 1
    assert checked > 500


def test_trainer_view_with_control_tokens(flagship, loaded, tokenizers):
    """With the card's control atoms added, prompt tokens are an exact prefix (TRL's completion mask)."""
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZER_DIRS

    manifest = json.loads((flagship / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIRS["qwen2.5"]))
    assert add_control_tokens(tok, manifest["control_tokens"]) > 0
    rows = [r for r in loaded["train"] if r["kind"] == "injected"][:100]
    for row in rows:
        prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        full_ids = tok(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids, row["id"]
        enc = tokenize(row, tok)
        first = enc["labels"].index(next(t for t in enc["labels"] if t != -100))
        assert first == len(prompt_ids)
        assert tok.convert_ids_to_tokens(enc["input_ids"][first]).startswith("[CATEGORY")
    # re-rendering for the other family gives that family's X
    phi = tokenizers["phi-3-mini"]
    row = rows[0]
    rendered = render(row, phi)
    assert rendered.backtrack == next(b["tokens"] for b in row["backtrack"] if b["tokenizer"] == "phi-3-mini")
    assert f"[BACKTRACK_BY_{rendered.backtrack}]" in rendered.completion


def test_funnel_adds_up_and_card(flagship):
    manifest = json.loads((flagship / "manifest.json").read_text())
    funnel = manifest["funnel"]
    assert funnel["rows"] == funnel["kept"] + funnel["rejected"]
    assert sum(funnel["rejected_by_reason"].values()) == funnel["rejected"]
    assert funnel["kept"] == sum(manifest["counts"]["default"].values())
    assert funnel["kept_by_kind"]["clean"] > 0 and funnel["kept_by_kind"]["injected"] > 0
    card = (flagship / "README.md").read_text()
    assert card.startswith("---\n") and "Content warning" in card.split("# ", 1)[0] + card[:1200]
    assert "config_name: rejected" in card and "task_categories" in card
    assert f"| **kept** | **{funnel['kept']}** |" in card
    assert "<script" not in card
    for key in ("recipe_sha256", "package_version", "seed", "tokenizers", "control_tokens"):
        assert key in manifest
    assert (flagship / "recipe.yaml").exists() and (flagship / "plots" / "positions.png").exists()


def test_positions_uniform_over_fifths(loaded):
    """1,000+ rows (220 answers x 5 variants): each fifth gets 20% ± 5% of the injections."""
    rows = [r for split in loaded.values() for r in split if r["kind"] == "injected"]
    all_rows = sum(split.num_rows for split in loaded.values())
    positions = [r["injection"]["relative_position"] for r in rows]
    counts = fifths_histogram(positions)
    shares = [c / len(positions) for c in counts]
    assert all_rows >= 800, all_rows
    assert all(0.15 <= s <= 0.25 for s in shares), shares


def test_same_recipe_same_bytes(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = run_cli(
            "build", str(FLAGSHIP), "--out", str(out), "--limit", "40", "--set", "output.chunk_rows=15"
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.parquet"))
    assert files
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_plots_are_a_function_of_the_data(tmp_path):
    """The card's figures redrawn from the folder are the same bytes (no software tag, fixed
    margins)."""
    out = tmp_path / "out"
    build(load_recipe(FLAGSHIP, ["output.chunk_rows=15"]), out, limit=30)
    redrawn = write_score_plots(out, out_dir=tmp_path / "redrawn")
    assert redrawn
    assert [Path(p).read_bytes() for p in redrawn] == [
        (out / "plots" / Path(p).name).read_bytes() for p in redrawn
    ]
    assert run_cli("verify", str(out)).returncode == 0


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """Kill the build after its first finished chunks; damage one of them; the re-run resumes the
    others, redoes the damaged one (and says so), and gives the same bytes."""
    args = ["--limit", "200", "--set", "output.chunk_rows=10", "--set", "sampling.variants_per_answer=2"]
    reference = tmp_path / "reference"
    assert run_cli("build", str(FLAGSHIP), "--out", str(reference), *args).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [CLI, "build", str(FLAGSHIP), "--out", str(out), *args],
        env=os.environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = tmp_path / ".killed.bsafe-work"  # chunks live beside the dataset folder until it is in place
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob("chunk-000002")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [p for p in work.glob("chunk-*") if not p.name.endswith(".tmp")]
    assert 0 < len(finished) < 20 and not (out / "manifest.json").exists()
    damaged = work / "chunk-000000" / "train.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-40])  # a disk that lost the file's tail
    resumed = run_cli("build", str(FLAGSHIP), "--out", str(out), *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "Traceback" not in resumed.stderr
    assert (
        "chunk 0 of the last run did not read back (train.parquet changed since it was written): redone"
        in (" ".join(resumed.stderr.split()))
    )
    for rel in sorted(p.relative_to(reference) for p in reference.rglob("*.parquet")):
        assert pq.read_table(out / rel).equals(pq.read_table(reference / rel)), rel
        assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert not work.exists()  # the finished build removed its chunks


def test_broken_corpus_rows_are_rejected_with_reasons(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    good = {
        "prompt": "How do I water a fern?",
        "response": "Water it weekly. Keep the soil moist. Avoid direct sun.",
    }
    lines = [
        json.dumps({"id": "ok", **good}),
        json.dumps({"id": "nofield", "prompt": "hi"}),
        json.dumps({"id": "wrongtype", "prompt": "hi", "response": 42}),
        json.dumps({"id": "empty", "prompt": "hi", "response": "   "}),
        json.dumps({"id": "short", "prompt": "hi", "response": "One sentence only."}),
        json.dumps({"id": "noassistant", "messages": [{"role": "user", "content": "hi"}]}),
        "{broken json",
    ]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = run_cli(
        "build",
        str(FLAGSHIP),
        "--out",
        str(out),
        "--source",
        str(corpus),
        "--set",
        "sampling.variants_per_answer=1",
        "--allow-empty",  # the one good row's fate depends on its seed: not the point here
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rejected = {source_row_key(r): r["reasons"] for r in load_dataset(str(out), "rejected")["train"]}
    assert rejected["nofield"] == ["missing_field"]
    assert rejected["wrongtype"] == ["wrong_type"]
    assert rejected["empty"] == ["empty_response"]
    assert rejected["short"] == ["too_few_sentences"]
    assert rejected["noassistant"] == ["no_assistant_turn"]
    assert ["wrong_type"] in rejected.values()  # the broken JSON line
    funnel = json.loads((out / "manifest.json").read_text())["funnel"]
    assert funnel["source_rows"] == 7 and funnel["rows"] == funnel["kept"] + funnel["rejected"]


def test_show_colours_segments(flagship):
    proc = run_cli("show", str(flagship), "--n", "2", "--kind", "injected")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("── ") == 2 and "[CATEGORY" in proc.stdout


def test_broken_recipe_clear_message(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: x\nsources: []\nsampling:\n  clean_fraction: 3\n")
    proc = run_cli("build", str(recipe), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "sources" in proc.stderr and "sampling.clean_fraction" in proc.stderr and "line 4" in proc.stderr
    assert "Traceback" not in proc.stderr
