"""TRL's SFTTrainer trains on exactly the tokens ``bsafe_data.tokenize`` labels, on the built flagship.

The flagship recipe is built with the real CLI; TRL's own dataset preparation (prompt-completion rows,
``completion_only_loss=True``) runs on a tiny random Llama made here from a config, and every row's
``input_ids`` and ``labels`` are compared with ``bsafe_data.tokenize``: for the primary tokenizer
(Qwen2.5) as built, after ``rerender`` for the second family (Phi-3) and for chat templates of other
families (Llama 3, Mistral, a thinking template, plain text, no template). Needs the ``[train]``
extra (torch, trl); skipped without it. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (torch, trl): pip install -e '.[train]'")
trl = pytest.importorskip("trl", reason="needs the [train] extra (torch, trl): pip install -e '.[train]'")

from datasets import load_dataset  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from bsafe_data import (  # noqa: E402
    ControlTokenError,
    add_control_tokens,
    control_tokens,
    end_of_turn,
    rerender,
    tokenize,
)
from tests.conftest import REPO, TOKENIZER_DIRS  # noqa: E402
from tests.test_label import BOS_FAMILIES, FAMILIES, family_tokenizer  # noqa: E402

CLI = str(Path(sys.executable).with_name("bsafe-data"))
FLAGSHIP = REPO / "recipes" / "bsafe_plus.yaml"
EXAMPLE = REPO / "examples" / "train_sft.py"


@pytest.fixture(scope="module")
def flagship(tmp_path_factory) -> Path:
    """The flagship recipe built with the CLI on the first 60 source rows (300 rows considered)."""
    out = tmp_path_factory.mktemp("trl_flagship") / "bsafe_plus"
    proc = subprocess.run(
        [CLI, "build", str(FLAGSHIP), "--out", str(out), "--limit", "60"],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


@pytest.fixture(scope="module")
def manifest(flagship) -> dict:
    return json.loads((flagship / "manifest.json").read_text())


@pytest.fixture(scope="module")
def rows(flagship, tmp_path_factory):
    # Module fixtures run before conftest's per-test cache isolation: give `datasets` its own cache,
    # or a stale cache of another folder named bsafe_plus can be returned.
    cache = tmp_path_factory.mktemp("trl_datasets_cache")
    ds = load_dataset(str(flagship), split="train", cache_dir=str(cache))
    kinds = set(ds["kind"])
    assert kinds == {"injected", "clean"} and ds.num_rows > 150, (kinds, ds.num_rows)
    return ds


def fresh(name: str):
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIRS[name]))


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """A random one-layer Llama: enough for TRL to prepare data and take an optimizer step."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def sft_trainer(dataset, tokenizer, out: Path, eos_token: str | None = None):
    """TRL's SFTTrainer, standard prompt-completion set-up, CPU-safe; its dataset is prepared on init.

    The trainer gets a copy of the tokenizer (TRL sets ``eos_token`` on the one it is given).
    """
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out),
        completion_only_loss=True,
        eos_token=eos_token,
        max_length=None,
        max_steps=1,
        per_device_train_batch_size=1,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    return SFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=args,
        train_dataset=dataset.select_columns(["prompt", "completion"]),
        processing_class=copy.deepcopy(tokenizer),
    )


def assert_trl_equals_tokenize(trainer, dataset, tokenizer) -> None:
    """For every row: TRL's input ids and labels are bsafe_data.tokenize's, ending with E trained."""
    prepared = trainer.train_dataset
    assert prepared.num_rows == dataset.num_rows
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    for i, row in enumerate(dataset):
        want = tokenize(row, tokenizer)
        got = prepared[i]
        assert got["input_ids"] == want["input_ids"], (row["id"], i)
        assert got["labels"] == want["labels"], (row["id"], i)
        assert want["input_ids"][-1] == end_id and want["labels"][-1] == end_id, row["id"]
        assert -100 in want["labels"], row["id"]


def one_step(trainer) -> float:
    output = trainer.train()
    assert output.global_step == 1
    assert math.isfinite(output.training_loss) and output.training_loss > 0
    return output.training_loss


def test_trl_trains_exactly_the_tokenize_labels_for_the_primary_tokenizer(rows, manifest, tmp_path):
    tok = fresh("qwen2.5")
    added = add_control_tokens(tok, manifest["control_tokens"] + control_tokens(rows))
    assert added >= len(manifest["control_tokens"])
    # Completions end at the end-of-turn token, which for Qwen2.5-Instruct is also the EOS.
    assert all(c.endswith("<|im_end|>") and not c.endswith("\n") for c in rows["completion"])
    assert tok.eos_token == end_of_turn(tok) == "<|im_end|>"
    trainer = sft_trainer(rows, tok, tmp_path, eos_token=None)  # standard config: TRL's default EOS
    assert_trl_equals_tokenize(trainer, rows, tok)
    # The trained tokens are exactly the completion text.
    for row, got in zip(rows.select(range(20)), trainer.train_dataset.select(range(20)), strict=True):
        trained = [t for t in got["labels"] if t != -100]
        assert tok.decode(trained) == row["completion"], row["id"]
    one_step(trainer)


def test_trl_after_rerender_for_the_second_family(rows, tmp_path):
    phi = fresh("phi-3-mini")
    result = rerender(rows, phi, num_proc=2)
    assert result.tokenizer == "phi-3-mini" and result.end_of_turn == "<|end|>"
    assert result.rows_in == rows.num_rows
    assert result.rows_out == result.dataset.num_rows == rows.num_rows - sum(result.dropped.values())
    assert result.rows_out > 0.9 * rows.num_rows, result.dropped
    # X for phi is the one the build recorded for phi, and it now comes first.
    recorded = {
        r["id"]: next(b["tokens"] for b in r["backtrack"] if b["tokenizer"] == "phi-3-mini")
        for r in rows
        if r["kind"] == "injected"
    }
    new = result.dataset.to_list()
    injected = [r for r in new if r["kind"] == "injected"]
    assert injected
    for r in injected:
        assert r["backtrack"][0] == {"tokenizer": "phi-3-mini", "tokens": recorded[r["id"]]}, r["id"]
        control = f"[CATEGORY {r['injection']['category']}][BACKTRACK_BY_{recorded[r['id']]}]"
        assert r["completion"].startswith(control) and r["completion"].endswith("<|end|>"), r["id"]

    # Until its atoms are added, tokenize refuses to split them; control_tokens lists them.
    with pytest.raises(ControlTokenError, match="BACKTRACK_BY_"):
        tokenize(injected[0], phi)
    assert result.control_tokens == control_tokens(rows, phi)
    add_control_tokens(phi, result.control_tokens)

    # E (<|end|>) is not Phi-3's EOS (<|endoftext|>): with SFTConfig(eos_token=E) TRL appends nothing...
    assert phi.eos_token == "<|endoftext|>"
    trainer = sft_trainer(result.dataset, phi, tmp_path / "eot", eos_token=result.end_of_turn)
    assert_trl_equals_tokenize(trainer, result.dataset, phi)
    one_step(trainer)
    # ... while TRL's default appends the EOS after it and trains on one token more (what issue 10 measured).
    default = sft_trainer(result.dataset.select(range(30)), phi, tmp_path / "default", eos_token=None)
    eos_id = phi.convert_tokens_to_ids("<|endoftext|>")
    for row, got in zip(result.dataset.select(range(30)), default.train_dataset, strict=True):
        want = tokenize(row, phi)
        assert got["input_ids"] == want["input_ids"] + [eos_id]
        assert got["labels"] == want["labels"] + [eos_id]


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"qwen2.5", "phi-3-mini", "bytes"}))
def test_trl_matches_tokenize_for_other_template_families(rows, tmp_path, family):
    tok = family_tokenizer(family)
    result = rerender(rows, tok, name=family)
    assert result.end_of_turn == FAMILIES[family][0]
    systems = sum(any(t["role"] == "system" for t in c) for c in rows["context"])
    # This Mistral template refuses a system turn (test_label checks such drops on rows that have one).
    assert result.dropped.get("chat_template", 0) == (systems if family == "mistral" else 0)
    assert result.rows_out > 0.8 * rows.num_rows, result.dropped
    add_control_tokens(tok, result.control_tokens)
    trainer = sft_trainer(result.dataset, tok, tmp_path, eos_token=result.end_of_turn)
    assert_trl_equals_tokenize(trainer, result.dataset, tok)
    if family in BOS_FAMILIES:  # one BOS: the tokenizer's, not also the template's
        for got in trainer.train_dataset.select(range(10)):
            assert got["input_ids"][0] == tok.bos_token_id and got["input_ids"].count(tok.bos_token_id) == 1


def test_rerender_with_larger_x_gets_its_extra_atoms_from_control_tokens(rows, manifest, tmp_path):
    """A tokenizer outside the recipe (one token per byte) needs X the manifest does not cover."""
    tok = family_tokenizer("bytes")
    result = rerender(rows, tok, name="bytes")
    assert result.rows_out > 0.9 * rows.num_rows, result.dropped
    xs = [r[0]["tokens"] for r in result.dataset["backtrack"] if r]
    assert max(xs) > max(manifest["backtrack_max"].values())
    extra = sorted(set(result.control_tokens) - set(manifest["control_tokens"]))
    assert extra and all(a.startswith("[BACKTRACK_BY_") for a in extra), extra
    assert result.control_tokens == control_tokens(rows, tok) == control_tokens(result.dataset, tok)
    # With only the manifest's atoms some rows would be split: tokenize refuses them.
    add_control_tokens(tok, manifest["control_tokens"])
    needs_extra = next(
        r
        for r in result.dataset
        if r["backtrack"] and f"[BACKTRACK_BY_{r['backtrack'][0]['tokens']}]" in extra
    )
    with pytest.raises(ControlTokenError, match="BACKTRACK_BY_"):
        tokenize(needs_extra, tok)
    assert add_control_tokens(tok, control_tokens(result.dataset, tok)) == len(extra)
    trainer = sft_trainer(result.dataset, tok, tmp_path, eos_token=None)  # E is the EOS here
    assert_trl_equals_tokenize(trainer, result.dataset, tok)


def test_train_sft_example_runs_one_step(flagship, manifest, tmp_path):
    tok = fresh("qwen2.5")
    model_dir = tmp_path / "tiny-qwen"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            str(flagship),
            "--model",
            str(model_dir),
            "--max-steps",
            "1",
            "--batch-size",
            "1",
            "--limit",
            "40",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 1 and math.isfinite(summary["train_loss"])
    assert summary["eos_token"] == "<|im_end|>"
    assert summary["control_tokens_added"] >= len(manifest["control_tokens"])
    assert summary["vocab"] == len(tok) + summary["control_tokens_added"]
