"""A synthetic chat corpus for benchmarks: varied prose answers of 3–15 sentences, deterministic."""

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


def synthetic_rows(n: int, seed: int = 0):
    """Yield n prompt/response rows."""
    rng = random.Random(seed)
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(3, 15)):
            sentences.append(
                f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
            )
        yield {
            "id": f"syn-{i}",
            "prompt": f"Any advice about topic {i % 97}?",
            "response": " ".join(sentences),
        }


def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """Write n rows as JSONL."""
    with path.open("w", encoding="utf-8") as handle:
        for row in synthetic_rows(n, seed):
            handle.write(json.dumps(row) + "\n")
    return path
