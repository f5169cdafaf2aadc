"""Stage *segment*: sentence boundaries of the answers, with spaCy."""

from __future__ import annotations

import functools
from collections.abc import Sequence


class SegmentationError(Exception):
    """The configured spaCy pipeline cannot be loaded."""


@functools.lru_cache(maxsize=4)
def load_nlp(model: str):  # -> spacy.Language
    """``blank:LANG`` (+ sentencizer), or an installed trained pipeline with a parser/senter."""
    import spacy

    if model.startswith("blank:"):
        nlp = spacy.blank(model.split(":", 1)[1])
        nlp.add_pipe("sentencizer")
        return nlp
    try:
        nlp = spacy.load(model, exclude=["ner", "lemmatizer", "textcat"])
    except OSError as exc:
        raise SegmentationError(f"spaCy pipeline {model!r} is not installed: {exc}") from None
    if not ({"parser", "senter", "sentencizer"} & set(nlp.pipe_names)):
        nlp.add_pipe("sentencizer")
    return nlp


def sentence_spans(nlp, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
    """Character spans of the sentences of each text (whitespace-only sentences dropped)."""
    out = []
    for doc in nlp.pipe(texts, batch_size=256):
        spans = []
        for sent in doc.sents:
            text = sent.text
            stripped = text.rstrip()
            if not stripped.strip():
                continue
            start = sent.start_char + (len(text) - len(text.lstrip()))
            spans.append((start, sent.start_char + len(stripped)))
        out.append(spans)
    return out
