"""Stage *sample*: per-row seeds, injection-point candidates and the draws that pick among them.

Candidate injection points sit *before* the whitespace that separates two pieces of text, so
``part1 = response[:offset]`` ends on a non-space character and ``part2 = response[offset:]``
starts with the original whitespace. Offset 0 (before the first sentence) is a candidate too.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bsafe_data.recipe import PositionSpec

_WORD_END = re.compile(r"\S(?=\s+\S)")


@dataclass(frozen=True)
class Candidate:
    """A possible injection point."""

    offset: int
    sentence_index: int  # the sentence the continuation starts in (0 = the first)


def candidates(
    text: str, spans: Sequence[tuple[int, int]], word_boundaries: bool, long_sentence_words: int
) -> list[Candidate]:
    """Offsets before each sentence (the first at 0) and, optionally, word ends inside long sentences."""
    if not spans:
        return []
    out = [Candidate(0, 0)]
    for i, (start, end) in enumerate(spans):
        if word_boundaries:
            sentence = text[start:end]
            if len(sentence.split()) > long_sentence_words:
                out.extend(Candidate(start + m.end(), i) for m in _WORD_END.finditer(sentence))
        if i + 1 < len(spans) and text[end].isspace():  # part2 must start with whitespace
            out.append(Candidate(end, i + 1))
    return out


def row_seed(*parts: object) -> int:
    """A 63-bit seed from (recipe seed, source identity, row position, ...): independent of order,
    sharding, paths and the ids rows carry."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF  # fits int64 columns


def split_of(seed: int, test_fraction: float, dataset: str, revision: str, index: int) -> str:
    """train/test for a source row, from (recipe seed, source identity, row position): no answer is
    in both splits."""
    draw = random.Random(row_seed(seed, "split", dataset, revision, index)).random()
    return "test" if draw < test_fraction else "train"


def draw_position(rng: random.Random, spec: PositionSpec) -> float:
    """A target relative position in [0, 1) from the configured distribution."""
    if spec.distribution == "beta":
        return rng.betavariate(spec.a, spec.b)
    return rng.random()


def pick_candidate(options: Sequence[Candidate], length: int, target: float) -> Candidate:
    """The candidate whose relative position is nearest to ``target`` (ties: the earlier one)."""
    return min(options, key=lambda c: (abs(c.offset / length - target), c.offset))


def weighted_choice(rng: random.Random, weights: dict[str, float]) -> str:
    """A key drawn with probability proportional to its weight (dict order is stable)."""
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys], k=1)[0]


def fifths_histogram(positions: Iterable[float], bins: int = 5) -> list[int]:
    """Counts of relative positions per equal-width bin of [0, 1]."""
    counts = [0] * bins
    for p in positions:
        counts[min(int(p * bins), bins - 1)] += 1
    return counts
