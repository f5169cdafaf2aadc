"""The embedded offline classifier: a trained profanity/offence model plus personal-data regexes.

Independent of the builtin generator's bank: ``alt-profanity-check`` is a linear SVM trained on
public offensive-language data (it ships its model in the wheel), and the regexes detect the shapes
of personal data (emails, phone numbers, SSNs, card numbers), not bank strings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bsafe_data.classify.base import ALL_TARGETS, Classifier, Score, is_unsafe

#: Offence probability from which the category ``offensive`` is recorded.
OFFENSIVE_AT = 0.5

_PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "pii:email": re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
    "pii:phone": re.compile(r"(?<!\d)(?:\+?1[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\d)"),
    "pii:ssn": re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)"),
    "pii:card": re.compile(r"(?<!\d)(?:\d{4}[ -]){3}\d{4}(?!\d)"),
}

#: what every pattern needs ("@", or three digits in a row): most texts are answered by this alone
_NEEDED = re.compile(r"@|\d{3}")


def pii_categories(text: str) -> list[str]:
    """The personal-data kinds found in ``text``."""
    if not _NEEDED.search(text):
        return []
    return [name for name, pattern in _PII_PATTERNS.items() if pattern.search(text)]


class BuiltinClassifier(Classifier):
    """Offence probability from alt-profanity-check; personal data found counts as unsafe (1.0)."""

    def __init__(self, name: str = "builtin", threshold: float = 0.5, targets: Sequence[str] | None = None):
        super().__init__()
        self.name = name
        self.threshold = threshold
        self.targets = tuple(targets) if targets else ALL_TARGETS
        self.usage = {"texts": 0}
        # loaded with the build's resources (~1 s: scikit-learn and the model), not by the first
        # chunk's scoring, where it would compete with the requests going out
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def score_batch(self, texts: Sequence[str]) -> list[Score]:
        """Score every text; empty texts are safe with score 0."""
        texts = list(texts)
        self.usage["texts"] += len(texts)
        probs = self._predict_prob(texts) if texts else []
        out = []
        for text, prob in zip(texts, probs, strict=True):
            if not text.strip():
                out.append(Score(self.name, "safe", 0.0))
                continue
            cats = pii_categories(text)
            score = round(max(float(prob), 1.0 if cats else 0.0), 6)
            if prob >= OFFENSIVE_AT:  # independent of the threshold, so refilter can change it
                cats = ["offensive", *cats]
            label = "unsafe" if is_unsafe(score, self.threshold) else "safe"
            out.append(Score(self.name, label, score, tuple(cats)))
        return out
