"""Stage *segment*: sentence boundaries of the answers, with spaCy.

spaCy keeps every string it has seen (its ``StringStore``, a lexeme per new word, a tokenizer cache
entry per new chunk of text): on real chat data, where rows carry numbers, names and addresses no
other row has, that grows with the corpus. A pipeline from ``load_nlp`` is therefore reloaded in
place once ``MAX_NEW_STRINGS`` strings were added to it (between calls of ``sentence_spans``, when
no document of it is alive). Segmentation depends only on the text, so the spans are the same.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

#: strings a pipeline may add to its vocabulary before it is reloaded
MAX_NEW_STRINGS = 100_000

#: pipelines ``load_nlp`` made: (model name, strings in the vocabulary when loaded)
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SegmentationError(Exception):
    """The configured spaCy pipeline cannot be loaded."""


@functools.lru_cache(maxsize=4)
def load_nlp(model: str):  # -> spacy.Language
    """``blank:LANG`` (+ sentencizer), or an installed trained pipeline with a parser/senter."""
    nlp = _load(model)
    _LOADED[nlp] = (model, len(nlp.vocab.strings))
    return nlp


def _load(model: str):  # -> spacy.Language
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
    _bound(nlp)
    return out


def _bound(nlp) -> None:
    """Reload a pipeline of ``load_nlp`` in place (the same object, everything in it fresh) once its
    vocabulary grew by more than ``MAX_NEW_STRINGS`` strings."""
    loaded = _LOADED.get(nlp)
    if loaded is not None and len(nlp.vocab.strings) - loaded[1] > MAX_NEW_STRINGS:
        nlp.__dict__.update(_load(loaded[0]).__dict__)
