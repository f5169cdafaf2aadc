"""The embedded offline generator: fills templates from a bundled category bank.

No network and no model. For each request it picks (with ``random.Random(request.seed)``) an
optional steering opener and a violation template of the requested category, and fills the slots:
``{topic}`` is a content word from the last sentence of ``part1`` (so the violation reads as a
continuation), ``{name}``/``{email}``/``{phone}``/``{ssn}``/``{address}`` are obviously fake
personal data (example.com emails, 555-01XX phone numbers, the SSA's advertising-reserved SSNs
987-65-4320..4329, made-up streets in "Anytown").

The bank (``bsafe_data/data/bank/categories.yaml``) is deliberately unsafe *training data* for
backtracking: non-actionable insults, crude language, fake doxxing and reckless claims.
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from bsafe_data.generate.base import Generation, GenerationRequest, Generator

BANK_PATH = Path(__file__).resolve().parent.parent / "data" / "bank" / "categories.yaml"
GENERIC_SECTION = "generic"
SLOTS = frozenset({"topic", "name", "email", "phone", "ssn", "address"})
STEERING_PROBABILITY = 0.5
FALLBACK_TOPIC = "this"

_FIRST_NAMES = (
    "Jordan", "Casey", "Morgan", "Riley", "Avery", "Quinn", "Taylor", "Jamie",
    "Dana", "Robin", "Skyler", "Harper", "Reese", "Emerson", "Parker", "Rowan",
)  # fmt: skip
_LAST_NAMES = (
    "Pemberly", "Quillfeather", "Marrowby", "Thistlewood", "Fenwick", "Oakhollow",
    "Brambleton", "Ashcombe", "Dunmore", "Wickersham", "Larkspur", "Greyfield",
)  # fmt: skip
_STREETS = (
    "Fakewood Lane", "Nowhere Street", "Placeholder Avenue", "Example Road",
    "Sample Court", "Fictional Drive", "Mockingbird Way", "Imaginary Boulevard",
)  # fmt: skip
_AREA_CODES = ("212", "310", "415", "617", "702", "808", "907", "503")

_STOPWORDS = frozenset(
    """
    about above after again against also although always among another anyone anything around
    because been before being below between both cannot could did does doing done down during
    each either else enough even ever every everyone everything first from further get gets getting
    give given good great have having here hers herself himself however into itself just keep kind
    know last least less like likely made make makes making many maybe might more most much must
    myself need needs never next none often once only other others otherwise ought ours ourselves
    over own perhaps please quite rather really same should since some something sometimes still
    such sure take than that their theirs them themselves then there therefore these they thing
    things think this those though through thus together too toward towards under until upon usually
    very want well were what whatever when whenever where whether which while whom whose will with
    within without would yeah your yours yourself yourselves okay first second third help helps
    helpful let lets going came come comes certainly definitely absolutely simply actually usually
    start starts begin step steps feel free tell look find work able true time times today best
    better instead remember note check consider ensure follow avoid include includes important
    different several various example especially possible whole part sort explain describe show
    write list tips idea ideas question answer
    """.split()
)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]")
_MIN_TOPIC_LEN = 4
_TAIL_CHARS = 600  # the last sentence is looked for only in the tail of part1


@dataclass(frozen=True)
class _Template:
    """A bank string with the slots it uses, precomputed at load time."""

    text: str
    slots: frozenset[str]


@dataclass(frozen=True)
class _Section:
    steering: tuple[_Template, ...]
    violations: tuple[_Template, ...]


def _compile(text: str, where: str) -> _Template:
    """Parse the ``{slot}`` fields of ``text``; unknown slots are a bank error."""
    slots = frozenset(field for _, field, _, _ in string.Formatter().parse(text) if field is not None)
    unknown = slots - SLOTS
    if unknown:
        raise ValueError(f"bank {where}: unknown slot(s) {sorted(unknown)} in {text!r}")
    return _Template(text, slots)


def _section(raw: dict, where: str) -> _Section:
    steering = tuple(_compile(str(t), where) for t in raw.get("steering") or ())
    violations = tuple(_compile(str(t), where) for t in raw.get("violations") or ())
    if not violations:
        raise ValueError(f"bank {where}: no violation templates")
    return _Section(steering, violations)


@functools.lru_cache(maxsize=1)
def _bank() -> tuple[dict[str, _Section], dict[str, str]]:
    """Load and compile the bank once: sections by category name, and a casefolded name index."""
    with BANK_PATH.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    sections = {name: _section(body, name) for name, body in raw["categories"].items()}
    sections[GENERIC_SECTION] = _section(raw[GENERIC_SECTION], GENERIC_SECTION)
    index = {name.casefold(): name for name in raw["categories"]}
    return sections, index


def bank_categories() -> list[str]:
    """The category names the bundled bank covers, in bank order (the generic section excluded)."""
    sections, _ = _bank()
    return [name for name in sections if name != GENERIC_SECTION]


def _candidates(text: str) -> list[str]:
    """Content words of ``text`` usable as a topic, in order, deduplicated, case kept."""
    words = _WORD_RE.findall(text)
    out: list[str] = []
    seen: set[str] = set()
    for i, word in enumerate(words):
        if word[-2:] in ("'s", "'S"):
            word = word[:-2]
        low = word.lower()
        if len(word) < _MIN_TOPIC_LEN or low in _STOPWORDS or low in seen or "'" in word:
            continue
        seen.add(low)
        # Lowercase ordinary words; keep acronyms and mid-sentence capitalised (proper) nouns.
        keep_case = word.isupper() or (i > 0 and word[0].isupper())
        out.append(word if keep_case else low)
    return out


def _last_sentence(text: str) -> str:
    """The last non-empty sentence of ``text`` (looking only at its tail)."""
    tail = text[-_TAIL_CHARS:].rstrip().rstrip(".!?\"')").rstrip()
    cut = max(tail.rfind(". "), tail.rfind("! "), tail.rfind("? "), tail.rfind("\n"))
    return tail[cut + 1 :] if cut >= 0 else tail


def _looks_like_noun(word: str) -> bool:
    """Cheap heuristic: adverbs and -ing/-ed verb forms make awkward topics."""
    low = word.lower()
    return not (low.endswith("ly") or (len(low) > 5 and low.endswith(("ing", "ed"))))


def pick_topic(request: GenerationRequest, rng: random.Random) -> str:
    """A word from the last sentence of part1, else from the last user turn, else ``"this"``.

    Among part1's candidates, words the user also used are preferred (they are what the
    conversation is about), then noun-looking words.
    """
    user_turns = [content for role, content in request.context if role == "user" and content]
    user_text = user_turns[-1][-_TAIL_CHARS:] if user_turns else ""
    words = _candidates(_last_sentence(request.part1)) if request.part1 else []
    if words:
        user_words = {w.lower() for w in _WORD_RE.findall(user_text)}
        shared = [w for w in words if w.lower() in user_words]
        nouns = [w for w in words if _looks_like_noun(w)]
        words = shared or nouns or words
    elif user_text:
        words = _candidates(user_text)
        words = [w for w in words if _looks_like_noun(w)] or words
    return rng.choice(words) if words else FALLBACK_TOPIC


def _fake_values(slots: frozenset[str], rng: random.Random) -> dict[str, str]:
    """Obviously fake personal data for the slots a template uses (fixed draw order)."""
    values: dict[str, str] = {}
    if "name" in slots or "email" in slots:
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        values["name"] = f"{first} {last}"
        values["email"] = f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@example.com"
    if "phone" in slots:
        values["phone"] = f"{rng.choice(_AREA_CODES)}-555-01{rng.randint(0, 99):02d}"
    if "ssn" in slots:
        values["ssn"] = f"987-65-432{rng.randint(0, 9)}"  # SSA range reserved for advertising
    if "address" in slots:
        values["address"] = f"{rng.randint(10, 9999)} {rng.choice(_STREETS)}, Anytown"
    return values


def _fill(template: _Template, topic: str, rng: random.Random) -> str:
    """Fill ``template`` and capitalise its first letter (a slot may open the sentence)."""
    values = _fake_values(template.slots, rng)
    values["topic"] = topic
    text = template.text.format_map(values) if template.slots else template.text
    return text[:1].upper() + text[1:]


class BuiltinGenerator(Generator):
    """Offline, deterministic generator backed by the bundled category bank.

    Nothing to count and nothing to release: ``usage`` is empty and ``close`` does nothing (the
    bank cache is shared and immutable).
    """

    backend = "builtin"
    model = "builtin-bank-v1"
    template = "bank-v1"

    def __init__(self) -> None:
        _bank()  # fail fast on a broken bank, and warm the cache

    def generate_one(self, request: GenerationRequest) -> Generation:
        """Generate for one request; output depends only on the request."""
        sections, index = _bank()
        rng = random.Random(request.seed)
        name = index.get(request.category.strip().casefold(), GENERIC_SECTION)
        section = sections[name]
        topic = pick_topic(request, rng)

        steering = ""
        if section.steering and rng.random() < STEERING_PROBABILITY:
            steering = _fill(rng.choice(section.steering), topic, rng)
        violation = _fill(rng.choice(section.violations), topic, rng)

        # Spliced right after part1: one leading space unless part1 is empty; the violation
        # always gets its own space when it follows a steering opener.
        lead = " " if request.part1 else ""
        if steering:
            steering, violation = lead + steering, " " + violation
        else:
            violation = lead + violation
        return Generation(steering=steering, violation=violation, category=request.category)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Return one Generation per request, in order; a failing row becomes a generator_error."""
        out = []
        for request in requests:
            try:
                out.append(self.generate_one(request))
            except Exception as exc:  # never let one row crash the run
                out.append(
                    Generation(
                        category=getattr(request, "category", ""),
                        error="generator_error",
                        detail=f"builtin: {type(exc).__name__}: {exc}",
                    )
                )
        return out
