"""Stage *hygiene*: text that would corrupt labels never reaches ``prompt``/``completion`` unnoticed.

Control atoms of the recipe's format (``[CATEGORY Toxic][BACKTRACK_BY_12]``) or a tokenizer's
special-token strings (``<|im_end|>``) inside a source turn would teach a clean row to backtrack
or end a turn early; inside generated text they would give a row two control signals. Such rows
are rejected (``source_contains_control`` / ``generated_contains_control``) or, with
``limits.control_strings: escape``, the strings are broken with a word joiner (U+2060) after their
first character. Lengths beyond ``limits`` and text that is not valid Unicode are rejected too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from bsafe_data.recipe import LimitsSpec

WORD_JOINER = "\u2060"
_SURROGATE = re.compile("[\ud800-\udfff]")


def special_strings(tokenizers: Mapping[str, Any]) -> list[str]:
    """Every special-token string of the tokenizers (longest first)."""
    found: set[str] = set()
    for tok in tokenizers.values():
        found.update(t.content for t in tok.added_tokens_decoder.values() if t.special)
        found.update(tok.all_special_tokens)
    return sorted((s for s in found if s), key=lambda s: (-len(s), s))


def control_regex(control_patterns: Iterable[str], tokenizers: Mapping[str, Any]) -> re.Pattern[str] | None:
    """One pattern for control atoms (regexes from the method) and special-token strings."""
    parts = [*control_patterns, *(re.escape(s) for s in special_strings(tokenizers))]
    return re.compile("|".join(parts)) if parts else None


def escape(text: str, pattern: re.Pattern[str]) -> str:
    """Break every match with a word joiner after its first character."""
    return pattern.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)


def invalid_unicode(text: str) -> bool:
    """True when ``text`` cannot be written as UTF-8 (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def replace_invalid(text: str) -> str:
    """``text`` with what cannot be written as UTF-8 replaced by U+FFFD (for the rejected row)."""
    return _SURROGATE.sub("\ufffd", text)


def source_problem(
    context: Iterable[tuple[str, str]], response: str, limits: LimitsSpec
) -> tuple[str, str] | None:
    """(reason, detail) when a conversation breaks a limit or holds invalid text, else None."""
    for i, (role, content) in enumerate(context):
        if invalid_unicode(content):
            return "invalid_text", f"context turn {i} ({role}) is not valid Unicode (lone surrogate)"
        if len(content) > limits.max_turn_chars:
            limit = limits.max_turn_chars
            return "turn_too_long", f"context turn {i} has {len(content):,} characters > {limit:,}"
    if invalid_unicode(response):
        return "invalid_text", "the answer is not valid Unicode (lone surrogate)"
    if len(response) > limits.max_answer_chars:
        return "answer_too_long", f"the answer has {len(response):,} characters > {limits.max_answer_chars:,}"
    return None


def generated_problem(text: str, limits: LimitsSpec) -> tuple[str, str] | None:
    """(reason, detail) when generated text is too long or invalid, else None."""
    if len(text) > limits.max_generated_chars:
        return (
            "violation_too_long",
            f"generated {len(text):,} characters > limits.max_generated_chars={limits.max_generated_chars:,}",
        )
    if invalid_unicode(text):
        return "invalid_text", "the generated text is not valid Unicode (lone surrogate)"
    return None


def first_match(pattern: re.Pattern[str] | None, texts: Iterable[tuple[str, str]]) -> str | None:
    """A detail naming where the first control string is ('' texts are skipped), or None."""
    if pattern is None:
        return None
    for where, text in texts:
        found = pattern.search(text)
        if found:
            return f"{where} contains {found.group(0)[:40]!r}"
    return None
