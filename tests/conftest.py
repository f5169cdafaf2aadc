"""Test-wide settings: offline Hugging Face, isolated caches, shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may download at test time: set before transformers/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIRS = {
    "qwen2.5": FIXTURES / "tokenizers" / "qwen2.5",
    "phi-3-mini": FIXTURES / "tokenizers" / "phi-3-mini",
}
REPO = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Keep HF and bsafe-data caches inside temp folders; a fresh `datasets` cache per test.

    `datasets` reads HF_DATASETS_CACHE at import, so the in-process value is patched too: a cache
    shared across tests can hand back another folder's rows for the same data file names.
    """
    import datasets

    home = tmp_path_factory.getbasetemp() / "hf_home"
    per_test = tmp_path_factory.mktemp("datasets_cache")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(per_test))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", per_test)
    monkeypatch.setenv("BSAFE_DATA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "bsafe_cache"))


@pytest.fixture(scope="session")
def tokenizers():
    """The two real tokenizer families used to check X."""
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(str(path)) for name, path in TOKENIZER_DIRS.items()}


def content_label(path: Path) -> str:
    """A local source's identity in rows (``source.dataset``) when it has no name: a digest of its
    bytes, computed here independently of the product."""
    import hashlib

    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def source_row_key(row: dict) -> str:
    """A row named by its source row's id (``g3/v0`` for the row ``3/v0`` of source row ``g3``):
    row ids count source positions, tests name the rows they wrote."""
    position = str(row["source"]["index"])
    assert row["id"].split(":")[-1].startswith(position), row["id"]
    return row["source"]["id"] + row["id"].split(":")[-1][len(position) :]
