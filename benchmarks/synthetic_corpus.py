"""Synthetic chat corpora for benchmarks: varied prose answers of 3–15 sentences, deterministic.

``closed``: every word comes from a small vocabulary. ``unique``: as real chat data, each row also
carries tokens no other row has (an order number, a name, a web address, a code, an amount), so
anything that keeps every string it has seen grows with the corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_SUBJECTS = [
    "The dough",
    "Your garden",
    "A good habit",
    "The engine",
    "This recipe",
    "Most people",
    "The library",
    "A short walk",
    "Your budget",
    "The old bridge",
    "Fresh basil",
    "The team",
]
_VERBS = ["needs", "benefits from", "depends on", "improves with", "starts with", "works best with"]
_OBJECTS = [
    "a little patience",
    "regular attention",
    "clear notes",
    "warm water and time",
    "a quiet morning",
    "careful planning",
    "small daily steps",
    "good light",
    "a simple checklist",
]
_TAILS = [
    "",
    " before you begin",
    ", especially in winter",
    " when the weather turns",
    ", which many beginners forget",
    " if you want reliable results over the long run",
]


CORPORA = ("closed", "unique")


def _unique_sentences(i: int, rng: random.Random) -> list[str]:
    """Sentences with tokens of row ``i`` alone: numbers, a name, a web address, a code."""
    name = f"{rng.choice(_NAMES)}{i:x}"
    return [
        f"Order {100_000 + i} ships to {name} on day {rng.randint(1, 28)}.",
        f"See https://{name.lower()}.example.org/notes/{i} and the code ZX{i * 7919 % 10**9:09d}.",
        f"The total is {i % 1000}.{i % 97:02d} dollars.",
    ]


_NAMES = ["Ada", "Bram", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hiro", "Ines", "Jonas"]


def synthetic_rows(n: int, seed: int = 0, corpus: str = "closed"):
    """Yield n prompt/response rows of ``corpus`` (``CORPORA``)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus {corpus!r} is not one of {CORPORA}")
    rng = random.Random(seed)
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(3, 15)):
            sentences.append(
                f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
            )
        if corpus == "unique":
            for sentence in _unique_sentences(i, rng):
                sentences.insert(rng.randint(0, len(sentences)), sentence)
        yield {
            "id": f"syn-{i}",
            "prompt": f"Any advice about topic {i % 97}?",
            "response": " ".join(sentences),
        }


def write_corpus(path: Path, n: int, seed: int = 0, corpus: str = "closed") -> Path:
    """Write n rows of ``corpus`` as JSONL."""
    with path.open("w", encoding="utf-8") as handle:
        for row in synthetic_rows(n, seed, corpus):
            handle.write(json.dumps(row) + "\n")
    return path
