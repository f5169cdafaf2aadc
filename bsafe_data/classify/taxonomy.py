"""One taxonomy mapping: RLBF's 18 categories ↔ Llama Guard S1–S14 ↔ OpenAI moderation categories.

Classifiers record their *native* categories in the ``scores`` column (``S10``, ``harassment``,
``offensive``, ``pii:email``; a judge names recipe categories directly). Rules map them to the
recipe's taxonomy here, at filter time, so a changed mapping is re-applied by ``refilter`` with no
classifier call. Each native category maps to an ordered tuple of RLBF categories, the closest
first (relabelling picks the first one the recipe samples).

The README's table is generated from this module (``markdown_table``) and checked by the tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from bsafe_data.recipe import RLBF_CATEGORIES

#: Llama Guard 3 / 4 hazard categories (MLCommons taxonomy), as in the model cards.
LLAMA_GUARD_HAZARDS: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}

#: OpenAI moderation categories (``omni-moderation-latest``).
OPENAI_MODERATION_CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)

#: Categories of the embedded builtin classifier (``pii:*`` covers every personal-data kind).
BUILTIN_CATEGORIES: tuple[str, ...] = ("offensive", "pii:*")

#: native category -> RLBF categories, closest first.
NATIVE_TO_RLBF: dict[str, tuple[str, ...]] = {
    # Llama Guard S1-S14
    "S1": ("Violent", "War & Conflict"),
    "S2": ("Illicit Drugs", "Dangerous Content", "Public Safety", "Finance"),
    "S3": ("Sexually Explicit", "Legal"),
    "S4": ("Under 18",),
    "S5": ("Legal",),
    "S6": ("Health", "Finance", "Legal"),
    "S7": ("Harassment", "Legal"),
    "S8": ("Legal",),
    "S9": ("Firearms & Weapons", "Dangerous Content", "Public Safety", "War & Conflict"),
    "S10": ("Hate Speech", "Religion & Belief"),
    "S11": ("Death Harm & Tragedy", "Health"),
    "S12": ("Sexually Explicit",),
    "S13": ("Politics",),
    "S14": ("Dangerous Content",),
    # OpenAI moderation
    "harassment": ("Harassment", "Toxic"),
    "harassment/threatening": ("Harassment", "Violent"),
    "hate": ("Hate Speech", "Religion & Belief", "Toxic"),
    "hate/threatening": ("Hate Speech", "Violent"),
    "illicit": ("Illicit Drugs", "Dangerous Content", "Public Safety", "Finance", "Legal"),
    "illicit/violent": ("Firearms & Weapons", "Violent", "Dangerous Content"),
    "self-harm": ("Death Harm & Tragedy", "Health"),
    "self-harm/intent": ("Death Harm & Tragedy", "Health"),
    "self-harm/instructions": ("Death Harm & Tragedy", "Health", "Dangerous Content"),
    "sexual": ("Sexually Explicit",),
    "sexual/minors": ("Under 18", "Sexually Explicit"),
    "violence": ("Violent", "War & Conflict", "Death Harm & Tragedy"),
    "violence/graphic": ("Violent", "Death Harm & Tragedy"),
    # builtin classifier
    "offensive": ("Toxic", "Profanity", "Harassment"),
    "pii:*": ("Harassment", "Legal"),
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9/:*-]+", "", name.strip().lower().replace("&", "and"))


_RLBF_BY_KEY = {_key(c): c for c in RLBF_CATEGORIES}
_NATIVE_BY_KEY = {_key(k): v for k, v in NATIVE_TO_RLBF.items()}


def rlbf_of(native: str) -> tuple[str, ...]:
    """RLBF categories a classifier category stands for (an RLBF name maps to itself); () if unknown.

    Classifier vocabularies are looked up first: OpenAI's ``harassment`` (also the spelling of the
    RLBF name) maps to Harassment and Toxic.
    """
    key = _key(native)
    if key.startswith("pii:"):
        key = "pii:*"
    found = _NATIVE_BY_KEY.get(key)
    if found is None and re.fullmatch(r"s\d+", key):  # "s10" spelled in lower case
        found = NATIVE_TO_RLBF.get(key.upper())
    if found is None and key in _RLBF_BY_KEY:
        found = (_RLBF_BY_KEY[key],)
    return found or ()


def to_recipe(
    native: str, recipe_categories: Sequence[str], extra: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """The recipe categories ``native`` maps to, closest first.

    ``extra`` (the recipe's ``filters.category_map``) wins: it maps native categories or RLBF names
    to recipe categories. Otherwise a recipe category equal to the name (or to one of its RLBF
    categories) is used, so RLBF-based recipes need no mapping at all.
    """
    extra = {_key(k): list(v) for k, v in (extra or {}).items()}
    wanted = {_key(c): c for c in recipe_categories}
    out: list[str] = []

    def add(names: Iterable[str]) -> None:
        for name in names:
            real = wanted.get(_key(name))
            if real is not None and real not in out:
                out.append(real)

    key = _key(native)
    for alias in (key, "pii:*" if key.startswith("pii:") else key):
        if alias in extra:
            add(extra[alias])
            return out
    add([native])
    for rlbf in rlbf_of(native):
        add(extra.get(_key(rlbf), [rlbf]))
    return out


def rlbf_table() -> list[tuple[str, list[str], list[str], list[str]]]:
    """Per RLBF category: the Llama Guard codes, OpenAI categories and builtin categories mapping to it."""
    rows = []
    for cat in RLBF_CATEGORIES:
        lg = [k for k in LLAMA_GUARD_HAZARDS if cat in NATIVE_TO_RLBF[k]]
        oa = [k for k in OPENAI_MODERATION_CATEGORIES if cat in NATIVE_TO_RLBF[k]]
        builtin = [k for k in BUILTIN_CATEGORIES if cat in NATIVE_TO_RLBF[k]]
        rows.append((cat, lg, oa, builtin))
    return rows


def markdown_table() -> str:
    """The mapping as the Markdown table the README shows (closest-first order is in the code)."""
    lines = [
        "| RLBF category | Llama Guard 3/4 | OpenAI moderation | builtin |",
        "|---|---|---|---|",
    ]
    for cat, lg, oa, builtin in rlbf_table():
        lg_text = ", ".join(f"{k} {LLAMA_GUARD_HAZARDS[k]}" for k in lg) or "—"
        oa_text = ", ".join(f"`{k}`" for k in oa) or "—"
        b_text = ", ".join(f"`{k}`" for k in builtin) or "—"
        lines.append(f"| {cat} | {lg_text} | {oa_text} | {b_text} |")
    return "\n".join(lines)
