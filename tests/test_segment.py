"""Stages segment and sample: sentence spans, injection-point candidates, per-row seeds, positions."""

from __future__ import annotations

import random
import statistics

import pytest

from bsafe_data.recipe import PositionSpec
from bsafe_data.stages import segment
from bsafe_data.stages.sample import (
    Candidate,
    candidates,
    draw_position,
    fifths_histogram,
    pick_candidate,
    row_seed,
    weighted_choice,
)
from bsafe_data.stages.segment import SegmentationError, load_nlp, sentence_spans

TEXTS = [
    "Dr. Smith arrived at 5 p.m. today. He left early.\n\nThen he came back!  Why? Nobody knows.",
    "e.g. this is it. The U.S. is big. Mr. Jones agrees.",
    "First line\nSecond line.\n\n- bullet one.\n- bullet two.",
    "   Leading space. Trailing space.   ",
    "Emoji first 😀. Then a café. Then 42 is the answer.",
    'He said "Stop." Then he left.',
    "One sentence without a final stop",
    "Numbers: 3.14 is pi. Version 2.0 shipped! Done?",
    "Tabs\tand  double  spaces. Another\tone.",
]


@pytest.fixture(scope="module")
def nlp():
    return load_nlp("blank:en")


@pytest.fixture(scope="module")
def spans(nlp):
    return sentence_spans(nlp, TEXTS)


def test_load_nlp_is_cached_and_unknown_pipelines_fail_cleanly():
    assert load_nlp("blank:en") is load_nlp("blank:en")
    assert "sentencizer" in load_nlp("blank:en").pipe_names
    with pytest.raises(SegmentationError, match="not installed"):
        load_nlp("xx_no_such_pipeline_sm")


def test_a_reloaded_pipeline_segments_the_same_and_its_vocabulary_stays_bounded(monkeypatch):
    """Texts with tokens of their own (as real chat data): ``load_nlp``'s pipeline is reloaded in
    place whenever its vocabulary grew past the bound, and segments exactly as one never reloaded."""
    import spacy

    monkeypatch.setattr(segment, "MAX_NEW_STRINGS", 400)
    texts = [
        f"Order {10_000 + i} ships to Name{i:x} on day {i % 28}. Dr. Z{i} said: see "
        f"https://n{i}.example.org/a/{i * 7}! Code ZX{i * 7919:09d}? Done.\n\nTotal {i}.{i % 97:02d} now."
        for i in range(600)
    ] + TEXTS
    bounded = load_nlp("blank:en")
    never_reloaded = spacy.blank("en")  # not from load_nlp: left as it is
    never_reloaded.add_pipe("sentencizer")
    initial = len(never_reloaded.vocab.strings)
    got, vocabularies, sizes = [], [], []
    for start in range(0, len(texts), 40):
        got += sentence_spans(bounded, texts[start : start + 40])
        vocabularies.append(bounded.vocab)
        sizes.append(len(bounded.vocab.strings))
    assert got == sentence_spans(never_reloaded, texts)
    assert len(never_reloaded.vocab.strings) - initial > 10 * segment.MAX_NEW_STRINGS  # it grows
    assert len({id(vocab) for vocab in vocabularies}) > 5  # reloaded, several times
    assert max(sizes) - initial <= segment.MAX_NEW_STRINGS  # bounded after every call
    assert load_nlp("blank:en") is bounded and "sentencizer" in bounded.pipe_names


def test_sentence_spans_on_abbreviations_and_newlines(spans):
    got = [[text[a:b] for a, b in s] for text, s in zip(TEXTS, spans, strict=True)]
    # spaCy's tokenizer exceptions keep "Dr.", "p.m.", "e.g.", "U.S.", "Mr." inside their sentence.
    assert got[0] == [
        "Dr. Smith arrived at 5 p.m. today.",
        "He left early.",
        "Then he came back!",
        "Why?",
        "Nobody knows.",
    ]
    assert got[1] == ["e.g. this is it.", "The U.S. is big.", "Mr. Jones agrees."]
    assert got[3] == ["Leading space.", "Trailing space."]
    assert got[5] == ['He said "Stop."', "Then he left."]
    assert got[6] == ["One sentence without a final stop"]
    assert got[7][0] == "Numbers: 3.14 is pi."  # a decimal point is not a sentence end


def test_sentence_spans_are_trimmed_ordered_and_disjoint(spans):
    for text, text_spans in zip(TEXTS, spans, strict=True):
        assert text_spans, text
        previous_end = 0
        for start, end in text_spans:
            assert previous_end <= start < end <= len(text)
            piece = text[start:end]
            assert piece == piece.strip() and piece
            assert text[previous_end:start].strip() == ""
            previous_end = end
        # Nothing but whitespace lies outside the spans.
        covered = "".join(text[a:b] for a, b in text_spans)
        assert "".join(covered.split()) == "".join(text.split())


def test_whitespace_only_texts_have_no_sentences(nlp):
    assert sentence_spans(nlp, ["", "   ", "\n\n\t"]) == [[], [], []]
    assert candidates("   ", [], word_boundaries=True, long_sentence_words=2) == []


@pytest.mark.parametrize("word_boundaries", [False, True])
def test_candidates_sit_before_whitespace(spans, word_boundaries):
    for text, text_spans in zip(TEXTS, spans, strict=True):
        options = candidates(text, text_spans, word_boundaries, long_sentence_words=4)
        assert options[0] == Candidate(0, 0)
        offsets = [c.offset for c in options]
        assert offsets == sorted(set(offsets)), "strictly increasing, no duplicates"
        indexes = [c.sentence_index for c in options]
        assert indexes == sorted(indexes)
        for c in options[1:]:
            part1, part2 = text[: c.offset], text[c.offset :]
            assert part1 and not part1[-1].isspace(), (text, c)
            if c.offset < len(text):  # within the text: the original whitespace starts part2
                assert text[c.offset].isspace(), (text, c)
            assert part1 + part2 == text
            # The continuation starts in sentence `sentence_index`.
            start, end = text_spans[c.sentence_index]
            assert c.offset <= end
        boundary_count = sum(1 for c in options[1:] if any(c.offset == e for _, e in text_spans))
        assert boundary_count == len(text_spans) - 1


def test_sentence_candidates_point_at_the_next_sentence(nlp):
    text = "Alpha beta. Gamma delta.\nEpsilon."
    (text_spans,) = sentence_spans(nlp, [text])
    options = candidates(text, text_spans, word_boundaries=False, long_sentence_words=100)
    assert options == [Candidate(0, 0), Candidate(11, 1), Candidate(24, 2)]
    assert [text[c.offset :][:2] for c in options] == ["Al", " G", "\nE"]


def test_no_candidate_between_sentences_without_whitespace(nlp):
    text = "I like it.Really a lot. Yes."
    (text_spans,) = sentence_spans(nlp, [text])
    for c in candidates(text, text_spans, word_boundaries=False, long_sentence_words=100)[1:]:
        assert text[c.offset].isspace(), (c, text[c.offset :])


def test_word_boundary_candidates_only_inside_long_sentences(nlp):
    short = "One two three four."  # 4 words: not long when the limit is 4
    long = "One two three four five six."  # 6 words: long
    text = f"{short} {long} End."
    (text_spans,) = sentence_spans(nlp, [text])
    assert len(text_spans) == 3
    options = candidates(text, text_spans, word_boundaries=True, long_sentence_words=4)
    inside = [c for c in options if c.offset not in {0} | {end for _, end in text_spans}]
    long_start, long_end = text_spans[1]
    assert all(long_start < c.offset < long_end and c.sentence_index == 1 for c in inside)
    assert [text[: c.offset].split()[-1] for c in inside] == ["One", "two", "three", "four", "five"]
    assert candidates(text, text_spans, word_boundaries=False, long_sentence_words=4) == [
        c for c in options if c not in inside
    ]
    # A limit at or above the longest sentence's word count: no word candidates at all.
    assert candidates(text, text_spans, word_boundaries=True, long_sentence_words=6) == [
        c for c in options if c not in inside
    ]


def test_word_boundaries_handle_newlines_and_repeated_whitespace(nlp):
    text = "Mix  the flour\nwith\t\twater and   salt until smooth and soft."
    (text_spans,) = sentence_spans(nlp, [text])
    options = candidates(text, text_spans, word_boundaries=True, long_sentence_words=2)
    words = text.split()
    assert len(options) == 1 + len(words) - 1  # offset 0, then one candidate per gap between words
    for c in options[1:]:
        assert text[c.offset].isspace() and not text[c.offset - 1].isspace()


def test_row_seed_is_deterministic_and_distinct():
    assert row_seed(1234, "corpus", "row-7", 0) == row_seed(1234, "corpus", "row-7", 0)
    variants = {
        row_seed(1234, "corpus", "row-7", 0),
        row_seed(1234, "corpus", "row-7", 1),
        row_seed(1235, "corpus", "row-7", 0),
        row_seed(1234, "corpus", "row-8", 0),
        row_seed(1234, "other", "row-7", 0),
        row_seed(1234, "corpusrow-7", 0),  # the separator keeps ("a", "b") apart from ("ab",)
        row_seed(1234, "corpus", "row-7"),
    }
    assert len(variants) == 7
    seeds = [row_seed(0, "ds", str(i)) for i in range(2000)]
    assert len(set(seeds)) == 2000
    assert all(0 <= s < 2**63 for s in seeds)  # fits an int64 column


def test_row_seed_pinned_values():
    # Independent of process, platform and hash randomisation. Changing these changes every dataset built.
    assert row_seed(0, "a") == 2962476648899723354
    assert row_seed(1234, "builtin:everyday_chat", "0", 0) == 2616295671169545138


def test_draw_position_uniform_and_beta():
    uniform = [draw_position(random.Random(i), PositionSpec()) for i in range(2000)]
    assert all(0 <= p < 1 for p in uniform)
    assert abs(statistics.mean(uniform) - 0.5) < 0.03
    assert min(fifths_histogram(uniform)) > 300  # every fifth is hit
    late = PositionSpec(distribution="beta", a=5, b=1)
    skewed = [draw_position(random.Random(i), late) for i in range(2000)]
    assert all(0 <= p <= 1 for p in skewed)
    assert abs(statistics.mean(skewed) - 5 / 6) < 0.03
    # Same rng state, same draw.
    assert draw_position(random.Random(7), late) == draw_position(random.Random(7), late)


def test_pick_candidate_nearest_with_ties_to_the_earlier():
    options = [Candidate(0, 0), Candidate(20, 1), Candidate(50, 2), Candidate(80, 3)]
    assert pick_candidate(options, 100, 0.0) == Candidate(0, 0)
    assert pick_candidate(options, 100, 0.09) == Candidate(0, 0)
    assert pick_candidate(options, 100, 0.11) == Candidate(20, 1)
    assert pick_candidate(options, 100, 0.35) == Candidate(20, 1)  # tie between 20 and 50: the earlier
    assert pick_candidate(options, 100, 0.36) == Candidate(50, 2)
    assert pick_candidate(options, 100, 0.99) == Candidate(80, 3)
    assert pick_candidate(list(reversed(options)), 100, 0.35) == Candidate(20, 1)  # order-independent


def test_weighted_choice_and_histogram():
    rng = random.Random(3)
    draws = [weighted_choice(rng, {"a": 1.0, "b": 0.0, "c": 3.0}) for _ in range(4000)]
    assert "b" not in draws
    assert 0.7 < draws.count("c") / len(draws) < 0.8
    assert fifths_histogram([0.0, 0.19, 0.2, 0.5, 0.99, 1.0]) == [2, 1, 1, 0, 2]
