"""Tests for the offline builtin generator and its category bank."""

from __future__ import annotations

import re
import time

import pytest
import yaml

from bsafe_data.generate.base import Generation, GenerationRequest, Generator
from bsafe_data.generate.builtin import BANK_PATH, BuiltinGenerator, bank_categories

RLBF_CATEGORIES = [
    "Dangerous Content", "Harassment", "Hate Speech", "Sexually Explicit", "Under 18", "Toxic",
    "Profanity", "Death Harm & Tragedy", "Violent", "Firearms & Weapons", "Public Safety", "Health",
    "Religion & Belief", "Illicit Drugs", "War & Conflict", "Politics", "Finance", "Legal",
]  # fmt: skip

CONTEXT = (("user", "How do I bake sourdough bread at home?"),)
PART1 = "Great question! Sourdough needs time. Feed the sourdough starter with flour and water."
SLOT_RE = re.compile(r"\{[^{}]*\}")
EMAIL_RE = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
PHONE_RE = re.compile(r"(?<!\d)(?:\+?1[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\d)")
SSN_RE = re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")


@pytest.fixture(scope="module")
def gen() -> BuiltinGenerator:
    return BuiltinGenerator()


def req(category: str, seed: int, part1: str = PART1, context=CONTEXT) -> GenerationRequest:
    return GenerationRequest(f"row-{seed}", context, part1, category, seed)


def run(gen: BuiltinGenerator, requests: list[GenerationRequest]) -> list[Generation]:
    out = gen.generate_batch(requests)
    assert len(out) == len(requests)
    return out


def has_pii(text: str) -> bool:
    return bool(EMAIL_RE.search(text) or PHONE_RE.search(text) or SSN_RE.search(text))


def test_implements_protocol(gen: BuiltinGenerator) -> None:
    assert isinstance(gen, Generator)
    assert (gen.backend, gen.model, gen.template) == ("builtin", "builtin-bank-v1", "bank-v1")
    gen.close()  # harmless, and the generator keeps working afterwards
    assert run(gen, [req("Toxic", 1)])[0].violation


def test_bank_is_package_data_with_all_categories() -> None:
    assert BANK_PATH.parts[-4:] == ("bsafe_data", "data", "bank", "categories.yaml")
    assert bank_categories() == RLBF_CATEGORIES
    raw = yaml.safe_load(BANK_PATH.read_text(encoding="utf-8"))
    for name in RLBF_CATEGORIES:
        section = raw["categories"][name]
        assert len(section["violations"]) >= 12, name
        assert section["steering"], name


def test_deterministic(gen: BuiltinGenerator) -> None:
    requests = [req(cat, seed) for cat in RLBF_CATEGORIES for seed in (0, 7, 123456789)]
    first = run(gen, requests)
    assert run(gen, requests) == first
    assert run(BuiltinGenerator(), list(reversed(requests))) == list(reversed(first))


def test_seeds_vary(gen: BuiltinGenerator) -> None:
    for cat in RLBF_CATEGORIES:
        out = run(gen, [req(cat, seed) for seed in range(50)])
        assert len({g.violation for g in out}) >= 10, cat
        with_steering = sum(bool(g.steering) for g in out)
        assert 10 <= with_steering <= 40, (cat, with_steering)  # ~50%, never all or none


@pytest.mark.parametrize("category", RLBF_CATEGORIES)
def test_every_category_produces_filled_on_topic_text(gen: BuiltinGenerator, category: str) -> None:
    out = run(gen, [req(category, seed) for seed in range(100)])
    on_topic = 0
    for g in out:
        assert g.error is None and g.category == category
        assert g.violation.strip(), g
        text = g.steering + g.violation
        assert not SLOT_RE.search(text), text
        assert "{" not in text and "}" not in text, text
        on_topic += "sourdough" in text.lower()
    # "sourdough" is in both the last sentence of part1 and the user turn, so it is the topic.
    assert on_topic >= 40, (category, on_topic)


def test_topic_comes_from_last_sentence(gen: BuiltinGenerator) -> None:
    part1 = "Tea is lovely. Volcanoes erupt molten magma."
    out = run(gen, [req("Profanity", seed, part1=part1, context=()) for seed in range(60)])
    seen = set()
    for g in out:
        low = g.violation.lower()
        assert not re.search(r"\btea\b", low), g.violation
        hits = [w for w in ("volcanoes", "erupt", "molten", "magma") if w in low]
        assert hits, g.violation  # every Profanity template carries {topic}
        seen.update(hits)
    assert len(seen) >= 2  # the seeded RNG picks among the candidates


def test_topic_fallbacks(gen: BuiltinGenerator) -> None:
    ctx = (("user", "Tell me about glaciers"), ("assistant", "Sure."), ("user", "And icebergs?"))
    out = run(gen, [req("Profanity", seed, part1="Sure, ok.", context=ctx) for seed in range(30)])
    assert all("iceberg" in g.violation.lower() for g in out)  # last user turn, not the first
    out = run(gen, [req("Profanity", seed, part1="Ok.", context=()) for seed in range(30)])
    assert all(re.search(r"\bthis\b", g.violation.lower()) for g in out)
    ctx = (("user", "Explain glaciers"),)
    out = run(gen, [req("Profanity", seed, part1="", context=ctx) for seed in range(30)])
    assert all("glaciers" in g.violation.lower() for g in out)


def test_leading_space_rules(gen: BuiltinGenerator) -> None:
    for cat in RLBF_CATEGORIES + ["Custom"]:
        for seed in range(40):
            g = run(gen, [req(cat, seed)])[0]
            text = g.steering + g.violation
            assert text.startswith(" ") and not text.startswith("  "), repr(text)
            assert g.violation.startswith(" ") and not g.violation.startswith("  ")
            if g.steering:
                assert g.steering.startswith(" ") and not g.steering.startswith("  ")
            assert "  " not in text and text == text.rstrip()

            e = run(gen, [req(cat, seed, part1="")])[0]
            assert not (e.steering + e.violation).startswith(" "), repr(e)
            if e.steering:
                assert e.violation.startswith(" ") and not e.violation.startswith("  ")
            assert e.violation.strip()


def test_unknown_and_case_insensitive_categories(gen: BuiltinGenerator) -> None:
    out = run(gen, [req("Spam & Scams (custom)", seed) for seed in range(50)])
    assert all(g.error is None and g.category == "Spam & Scams (custom)" and g.violation.strip() for g in out)
    assert not any(SLOT_RE.search(g.steering + g.violation) for g in out)
    assert len({g.violation for g in out}) >= 8
    # A casing variant of a bank category uses that category's section, keeping the requested name.
    a = run(gen, [req("hate speech", seed) for seed in range(20)])
    b = run(gen, [req("Hate Speech", seed) for seed in range(20)])
    assert [(x.steering, x.violation) for x in a] == [(x.steering, x.violation) for x in b]
    assert {x.category for x in a} == {"hate speech"}


def test_fake_personal_data_is_obviously_fake(gen: BuiltinGenerator) -> None:
    texts = [g.violation for cat in RLBF_CATEGORIES for g in run(gen, [req(cat, s) for s in range(100)])]
    emails = [m for t in texts for m in EMAIL_RE.findall(t)]
    phones = [m.group() for t in texts for m in PHONE_RE.finditer(t)]
    ssns = [m for t in texts for m in SSN_RE.findall(t)]
    assert emails and phones and ssns
    assert all(e.endswith("@example.com") for e in emails)
    assert all("-555-01" in p for p in phones)
    assert all(s.startswith("987-65-432") for s in ssns)


def test_bad_row_becomes_error_not_exception(gen: BuiltinGenerator) -> None:
    bad = GenerationRequest("bad", CONTEXT, PART1, None, 1)  # type: ignore[arg-type]
    out = run(gen, [req("Toxic", 1), bad, req("Legal", 2)])
    assert out[0].error is None and out[2].error is None
    assert out[1].error == "generator_error" and not out[1].violation
    assert out[2] == run(gen, [req("Legal", 2)])[0]


@pytest.mark.parametrize("category", RLBF_CATEGORIES)
def test_violations_flagged_by_offline_detector(gen: BuiltinGenerator, category: str) -> None:
    from profanity_check import predict_prob

    texts = [g.violation for g in run(gen, [req(category, seed) for seed in range(100)])]
    probs = predict_prob(texts)
    flagged = sum(p >= 0.5 or has_pii(t) for t, p in zip(texts, probs, strict=True))
    assert flagged >= 70, (category, flagged)


def test_throughput(gen: BuiltinGenerator) -> None:
    requests = [req(RLBF_CATEGORIES[i % 18], i) for i in range(20_000)]
    start = time.perf_counter()
    run(gen, requests)
    rate = len(requests) / (time.perf_counter() - start)
    assert rate >= 10_000, rate  # typically ~35k/s; a lenient floor so slow CI does not flake
