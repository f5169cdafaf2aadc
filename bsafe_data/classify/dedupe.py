"""Exact and near-duplicate detection of violations across a whole dataset (MinHash + LSH).

Texts are normalised (lower case, runs of non-alphanumerics collapsed to one space) before both
checks. Near duplicates: character n-gram shingles, a MinHash signature of ``num_perm`` universal
hash functions, and LSH with ``bands`` bands to find candidates; a candidate is a duplicate when the
estimated Jaccard similarity reaches ``threshold``. The hash functions come from a fixed seed, so
decisions are reproducible. The index only holds what was *kept*: the first text of a group stays.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

_NON_WORD = re.compile(r"[^0-9a-z]+")
_PRIME = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)
_SEED = 20240601


def normalise(text: str) -> str:
    """Lower case, non-alphanumerics collapsed to single spaces."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def shingles(text: str, size: int) -> set[str]:
    """Character ``size``-grams of the normalised text (the whole text when it is shorter)."""
    norm = normalise(text)
    if len(norm) <= size:
        return {norm} if norm else set()
    return {norm[i : i + size] for i in range(len(norm) - size + 1)}


class MinHasher:
    """MinHash signatures with ``num_perm`` hash functions ``(a*x + b) mod p`` on 32-bit shingle hashes."""

    def __init__(self, num_perm: int = 64, shingle: int = 5):
        rng = np.random.default_rng(_SEED)
        self.a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm
        self.shingle = shingle

    def signature(self, text: str) -> np.ndarray:
        """The signature (``num_perm`` uint32 values) of ``text``."""
        grams = shingles(text, self.shingle)
        if not grams:
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        x = np.array([_hash64(g.encode()) & 0xFFFFFFFF for g in sorted(grams)], dtype=np.uint64)
        values = ((np.outer(x, self.a) + self.b) % _PRIME) & _MASK32
        return values.min(axis=0).astype(np.uint32)


def jaccard(a: str, b: str, shingle: int = 5) -> float:
    """Exact Jaccard similarity of the shingle sets (for tests and reports)."""
    sa, sb = shingles(a, shingle), shingles(b, shingle)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


class DedupeIndex:
    """Remembers kept violations; ``check`` says whether a new one duplicates one of them."""

    def __init__(self, spec: Any):
        self.spec = spec
        self._exact: set[int] = set()
        self._hasher = MinHasher(spec.num_perm, spec.shingle) if spec.near else None
        self._rows = spec.num_perm // spec.bands
        self._buckets: dict[tuple[int, bytes], list[int]] = {}
        self._signatures: list[np.ndarray] = []

    @property
    def active(self) -> bool:
        """True when some check is switched on."""
        return bool(self.spec.exact or self.spec.near)

    def _bands(self, sig: np.ndarray) -> list[tuple[int, bytes]]:
        r = self._rows
        return [(i, sig[i * r : (i + 1) * r].tobytes()) for i in range(self.spec.bands)]

    def check(self, text: str) -> tuple[str | None, Any]:
        """(reason or None, state for ``add``): ``duplicate_violation``, ``near_duplicate_violation``."""
        norm = normalise(text)
        key = _hash64(norm.encode())
        if self.spec.exact and key in self._exact:
            return "duplicate_violation", None
        sig = None
        if self._hasher is not None:
            sig = self._hasher.signature(text)
            seen: set[int] = set()
            for band in self._bands(sig):
                for idx in self._buckets.get(band, ()):
                    if idx in seen:
                        continue
                    seen.add(idx)
                    if float(np.mean(self._signatures[idx] == sig)) >= self.spec.threshold:
                        return "near_duplicate_violation", None
        return None, (key, sig)

    def add(self, state: Any) -> None:
        """Remember a kept violation (``state`` from ``check``)."""
        key, sig = state
        self._exact.add(key)
        if sig is not None:
            idx = len(self._signatures)
            self._signatures.append(sig)
            for band in self._bands(sig):
                self._buckets.setdefault(band, []).append(idx)

    def check_and_add(self, text: str) -> str | None:
        """``check``, and ``add`` when it is not a duplicate."""
        reason, state = self.check(text)
        if reason is None:
            self.add(state)
        return reason
