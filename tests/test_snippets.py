"""Every ```python block of README.md and of a freshly built dataset card runs as written.

Only what a user must set is substituted: the dataset folder (``"out/bsafe_plus"`` in the README,
``REPO_OR_FOLDER`` in the card) and the card's ``MODEL_ID`` (a tiny random Llama saved here); TRL
runs one optimizer step (``max_steps=1``). The tokenizers resolve by their real Hub ids from an
offline Hugging Face cache built from the bundled tokenizer files (the layout ``huggingface_hub``
writes: ``models--ORG--NAME/snapshots/SHA`` and ``refs/main``), so nothing is downloaded. The
TRL block needs the ``[train]`` extra and is skipped without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TOKENIZER_DIRS

CLI = str(Path(sys.executable).with_name("bsafe-data"))
#: The upstream Hub ids of the bundled tokenizers (tests/fixtures/tokenizers/PROVENANCE.md).
HUB_IDS = {"Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5", "microsoft/Phi-3-mini-4k-instruct": "phi-3-mini"}
TRAIN_REASON = "needs the [train] extra (torch, trl): pip install -e '.[train]'"


def python_blocks(markdown: str) -> list[str]:
    """The code of every ```python fence."""
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


def offline_hub_cache(home: Path) -> None:
    """A Hugging Face cache under ``home`` holding the bundled tokenizers under their upstream ids."""
    for repo, name in HUB_IDS.items():
        base = home / "hub" / f"models--{repo.replace('/', '--')}"
        sha = hashlib.sha1(repo.encode()).hexdigest()
        snapshot = base / "snapshots" / sha
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in TOKENIZER_DIRS[name].iterdir():
            if path.is_file():
                shutil.copy(path, snapshot / path.name)
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(sha)
        # files the Hub repo has but the bundle does not carry (the model's config.json): recorded as
        # absent the way huggingface_hub does after a 404, so loaders go on without them offline
        missing = base / ".no_exist" / sha
        missing.mkdir(parents=True, exist_ok=True)
        (missing / "config.json").touch()


def substitute(code: str, old: str, new: str) -> str:
    """Replace exactly one occurrence (a snippet that drifted from what the test expects fails)."""
    assert code.count(old) == 1, f"expected {old!r} once in the snippet:\n{code}"
    return code.replace(old, new)


def run_snippet(code: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["HF_DATASETS_CACHE"] = str(cwd / "datasets_cache")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A fresh flagship build (CLI, 30 source rows) and the offline Hub cache."""
    base = tmp_path_factory.mktemp("snippets")
    folder = base / "bsafe_plus"
    proc = subprocess.run(
        [CLI, "build", str(REPO / "recipes" / "bsafe_plus.yaml"), "--out", str(folder), "--limit", "30"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    home = base / "hf_home"
    offline_hub_cache(home)
    return {"base": base, "folder": folder, "home": home}


def test_readme_python_blocks_run(workspace, tmp_path):
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python block"
    for i, block in enumerate(blocks):
        assert "..." not in block, f"README block {i} has a `...` placeholder"
        if "trl" in block and importlib.util.find_spec("trl") is None:
            pytest.skip(TRAIN_REASON)
        code = block.replace('"out/bsafe_plus"', repr(str(workspace["folder"])))
        proc = run_snippet(code + '\nprint("SNIPPET OK")\n', tmp_path, workspace["home"])
        assert proc.returncode == 0 and "SNIPPET OK" in proc.stdout, (
            f"README block {i}:\n{proc.stderr[-4000:]}"
        )


def test_card_python_blocks_run_one_training_step(workspace, tmp_path):
    card = (workspace["folder"] / "README.md").read_text(encoding="utf-8")
    blocks = python_blocks(card)
    assert blocks, "the card has no ```python block"
    manifest_ids = {"Qwen/Qwen2.5-0.5B-Instruct"}  # builtin:qwen2.5, the flagship's primary tokenizer
    for i, block in enumerate(blocks):
        assert "..." not in block, f"card block {i} has a `...` placeholder"
        assert "bf16=True" not in block and "cuda" not in block  # CPU-safe as written
        assert any(f'"{hub_id}"' in block for hub_id in manifest_ids), f"card block {i} names no real Hub id"
        code = substitute(
            block, 'REPO_OR_FOLDER = "REPO_OR_FOLDER"', f"REPO_OR_FOLDER = {str(workspace['folder'])!r}"
        )
        if "trl" in block:
            if importlib.util.find_spec("trl") is None or importlib.util.find_spec("torch") is None:
                pytest.skip(TRAIN_REASON)
            model_dir = tiny_model(tmp_path / "tiny")
            code = re.sub(r'^MODEL_ID = "[^"]+"', f"MODEL_ID = {str(model_dir)!r}", code, count=1, flags=re.M)
            assert str(model_dir) in code, 'the card snippet has no `MODEL_ID = "..."` line'
            code = substitute(code, "SFTConfig(", "SFTConfig(max_steps=1, ")
            code += '\nprint("STEPS", trainer.state.global_step)\n'
        proc = run_snippet(code, tmp_path, workspace["home"])
        assert proc.returncode == 0, f"card block {i}:\n{proc.stderr[-4000:]}"
        if "trl" in block:
            assert "STEPS 1" in proc.stdout, proc.stdout[-2000:]


def tiny_model(path: Path) -> Path:
    """A random one-layer Llama saved to ``path`` (the snippet resizes its embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    fence = readme[readme.index("## Set-up") :].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in fence.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 2, fence
    command = lines[1]
    assert "pip install -q torch==2.13.0 && " in command  # torch first: the CPU wheel, not a CUDA build
    parts = ("torch==2.13.0", "'.[test,train,eval-small]'", "install_browser", "pytest")
    order = [command.index(part) for part in parts]
    assert order == sorted(order), command
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == command


def test_readme_facts_match_the_flagship(tmp_path):
    import json

    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    corpus = REPO / "bsafe_data" / "data" / "corpus" / "everyday_chat.jsonl"
    conversations = sum(1 for line in corpus.read_text().splitlines() if line.strip())
    assert f"{conversations} conversations" in readme
    folder = tmp_path / "flagship"
    proc = subprocess.run(
        [CLI, "build", str(REPO / "recipes" / "bsafe_plus.yaml"), "--out", str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fifths = json.loads((folder / "manifest.json").read_text())["position_fifths"]
    stated = ", ".join(str(n) for n in fifths[:-1]) + f" and {fifths[-1]} injections"
    assert f"{sum(fifths)} kept injected rows)" in readme and stated in readme
    shares = [100 * n / sum(fifths) for n in fifths]
    assert f"({int(min(shares))}–{int(max(shares))} % each" in readme
