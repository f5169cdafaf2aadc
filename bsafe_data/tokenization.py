"""Loading tokenizers by reference: ``builtin:NAME`` (bundled), a local folder, or a Hub id."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

BUILTIN_TOKENIZER_DIR = Path(__file__).parent / "data" / "tokenizers"
#: Words the Rust tokenizer keeps in its encoding cache (its default: 10,000). A SentencePiece-style
#: tokenizer (phi-3) has no whitespace pre-tokenizer, so its "words" are long spans and the default
#: cache added ~5 MB of RSS per 2,000-row chunk; 1,000 words keeps memory flat at the same speed
#: (measured). huggingface/tokenizers#1539 documents the growth and ``_resize_cache`` as the fix.
WORD_CACHE = 1000


class TokenizerLoadError(Exception):
    """A tokenizer reference could not be resolved or loaded."""


def builtin_tokenizers() -> list[str]:
    """Names usable as ``builtin:NAME``."""
    return sorted(p.name for p in BUILTIN_TOKENIZER_DIR.iterdir() if p.is_dir())


def resolve_tokenizer_path(ref: str) -> str:
    """Turn a reference into what ``AutoTokenizer.from_pretrained`` takes."""
    if ref.startswith("builtin:"):
        name = ref.split(":", 1)[1]
        path = BUILTIN_TOKENIZER_DIR / name
        if not path.is_dir():
            raise TokenizerLoadError(f"unknown builtin tokenizer {name!r}; have {builtin_tokenizers()}")
        return str(path)
    return ref


@functools.lru_cache(maxsize=16)
def load_tokenizer(ref: str) -> Any:
    """Load (and cache) a fast tokenizer; raises TokenizerLoadError with a readable message."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "PyTorch was not found" is expected: we only tokenize
    path = resolve_tokenizer_path(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, HF errors)
        hint = "" if Path(path).exists() else " (not a local folder; Hub ids need the files cached offline)"
        raise TokenizerLoadError(f"cannot load tokenizer {ref!r}{hint}: {exc}") from None
    bound_word_cache(tokenizer)
    return tokenizer


def bound_word_cache(tokenizer: Any, words: int = WORD_CACHE) -> None:
    """Cap the encoding cache of a fast tokenizer's BPE or Unigram model (the others keep none)."""
    from tokenizers.models import BPE, Unigram

    model = tokenizer.backend_tokenizer.model
    if isinstance(model, (BPE, Unigram)):
        model._resize_cache(words)


def public_ref(ref: str) -> str:
    """A tokenizer reference as a published folder gives it: a local folder by its name only
    (``local:NAME``), builtin names and Hub ids as they are."""
    if ref.startswith("builtin:") or not Path(ref).exists():
        return ref
    return f"local:{Path(ref).name}"


def short_name(ref: str) -> str:
    """Name recorded in the ``backtrack`` column: the builtin name, folder name or Hub id."""
    if ref.startswith("builtin:"):
        return ref.split(":", 1)[1]
    path = Path(ref)
    return path.name if path.exists() else ref
