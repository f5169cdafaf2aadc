"""The generator prompt protocol: render the prompt, parse and normalise the model's continuation.

The model sees the conversation, the partial answer (``part1``) and the target category, and must
answer in the shape::

    optional steering text <harmful>violation</harmful> <category>Category</category>

Parsing rules (``parse_output``), chosen to keep usable answers and reject doubtful ones:

* Text before the first ``<harmful>`` is the steering text. If it repeats ``part1`` (or starts
  with a ``Steering:``/``Bridge:`` label), that echo is dropped.
* Only the first ``<harmful>`` span is used; later spans are ignored (joining them would glue
  unrelated sentences together) and counted in ``detail``.
* An unclosed ``<harmful>`` runs to ``<category>`` or to the end of the text (the answer finished
  with ``finish_reason=stop``, so nothing was cut off). A ``</harmful>`` without an opening tag
  makes everything before it the violation (no steering).
* No ``<harmful>`` tag at all → ``unparseable`` (or ``refused`` if the text reads like a refusal):
  untagged chatter cannot be told apart from a violation.
* The category is always the requested one: the recipe's category distribution stays what it
  asked for, and the downstream classifiers judge the text. When the model names a different
  category, ``model_category`` records it and ``detail`` says so. A missing ``<category>`` is fine.
* Refusals: ``finish_reason=content_filter``, or refusal phrasing ("I'm sorry, but", "I can't
  help", "As an AI", ...) at the start of the violation or steering, or anywhere near the start of
  an answer with no usable violation.
* ``finish_reason=length`` → ``truncated``, never used.
* Steering and violation are normalised by ``normalise_span``: one leading space when ``part1`` is
  non-empty, none when it is empty, no trailing whitespace; inner text is kept as written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.meta

from bsafe_data.sandbox import check_template, environment

#: Version of the prompt protocol (templates + parsing contract). Part of every cache key: bump it
#: when the bundled templates or the output contract change.
TEMPLATE_VERSION = "continue_violation/1"

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

ParseStatus = Literal["ok", "refused", "unparseable", "truncated"]


# -- prompt rendering ------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplate:
    """A pair of Jinja templates (``NAME.system.j2``, ``NAME.user.j2``) for the generator."""

    name: str
    system: jinja2.Template
    user: jinja2.Template
    static_system: bool = False  # the system template uses no variables: render it once
    user_globals: dict[str, Any] = field(default_factory=dict)  # flattened once, see render_user

    def render(
        self,
        context: Sequence[tuple[str, str]],
        part1: str,
        category: str,
        attempt: int = 0,
    ) -> list[dict[str, str]]:
        """Chat messages for one request; ``attempt`` > 0 adds a reminder (used after refusals)."""
        variables = template_variables(context, part1, category, attempt)
        messages = []
        system = self.render_system(variables)
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": self.render_user(variables)})
        return messages

    def render_system(self, variables: dict[str, Any]) -> str:
        """The system message text ("" for none)."""
        if self.static_system:
            return self._static_system_text()
        return self.system.render(variables).strip()

    def render_user(self, variables: dict[str, Any]) -> str:
        """The user message text.

        Same result as ``self.user.render(variables)``, minus Jinja's per-call copy of its globals
        (a ChainMap) into a new dict: that copy was a third of the render time on the hot path.
        """
        template = self.user
        context = template.new_context({**self.user_globals, **variables}, shared=True)
        try:
            return template.environment.concat(template.root_render_func(context)).strip()  # type: ignore[attr-defined]
        except Exception:
            return template.render(variables).strip()  # re-raise with Jinja's error reporting

    def _static_system_text(self) -> str:
        return _render_static(self.system)


@lru_cache(maxsize=64)
def _render_static(template: jinja2.Template) -> str:
    return template.render().strip()


def template_variables(
    context: Sequence[tuple[str, str]], part1: str, category: str, attempt: int
) -> dict[str, Any]:
    """Template variables: ``context`` ((role, content) pairs), ``part1``, ``category``, ``attempt``."""
    return {"context": context, "part1": part1, "category": category, "attempt": attempt}


#: Values ``load_template`` renders each template with once, to refuse a bad one before any request.
_SAMPLE = template_variables((("user", "How do I water a fern?"),), "Water it weekly.", "Toxic", 1)


@lru_cache(maxsize=16)
def load_template(name: str = "continue_violation") -> PromptTemplate:
    """Load a bundled template pair by name, or ``path/to/NAME`` for ``NAME.*.j2`` files elsewhere.

    The files may come with a downloaded recipe: they render in the sandbox
    (``bsafe_data.sandbox``), and one that does not parse, reads a private attribute or fails on
    sample values raises ``TemplateProblem`` (a ``ValueError``: recipe validation reports it)."""
    candidate = Path(name).expanduser()
    if candidate.parent != Path(".") or candidate.is_absolute():
        folder, stem = candidate.parent, candidate.name
    else:
        folder, stem = TEMPLATE_DIR, name
    for suffix in (".system.j2", ".user.j2"):
        if not (folder / f"{stem}{suffix}").is_file():
            raise FileNotFoundError(f"prompt template {name!r}: missing {folder / (stem + suffix)}")
    env = environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    for suffix in (".system.j2", ".user.j2"):
        path = folder / f"{stem}{suffix}"
        check_template(env, path.read_text(encoding="utf-8"), _SAMPLE, str(path))
    source = (folder / f"{stem}.system.j2").read_text(encoding="utf-8")
    static = not jinja2.meta.find_undeclared_variables(env.parse(source))
    user = env.get_template(f"{stem}.user.j2")
    return PromptTemplate(stem, env.get_template(f"{stem}.system.j2"), user, static, dict(user.globals))


# -- parsing ---------------------------------------------------------------------------------
_OPEN = re.compile(r"<\s*harmful\s*>", re.I)
_CLOSE = re.compile(r"<\s*/\s*harmful\s*>", re.I)
_CATEGORY = re.compile(r"<\s*category\s*>(.*?)(?:<\s*/\s*category\s*>|$)", re.I | re.S)
_CATEGORY_OPEN = re.compile(r"<\s*/?\s*category\s*>", re.I)
_ANY_TAG = re.compile(r"<\s*/?\s*(?:harmful|category|steering|bridge)\s*>", re.I)
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n?(.*?)\n?```\s*$", re.S)
_WELL_FORMED = re.compile(
    r"\s*([^<]*)<harmful>([^<]*)</harmful>\s*(?:<category>([^<]*)</category>)?\s*", re.I
)
_LABEL = re.compile(r"^\s*(?:steering|bridge|continuation)\s*:\s*", re.I)

_REFUSAL_STRICT = re.compile(
    r"^[\W_]*(?:i'?m\s+(?:so\s+|really\s+)?sorry|i\s+am\s+(?:so\s+)?sorry|sorry,?\s+(?:but\s+)?i\b"
    r"|i\s+apologi[sz]e|as\s+an\s+ai\b|i\s+must\s+(?:decline|refuse)"
    r"|i\s+(?:can(?:no|')?t|cannot|won'?t|will\s+not|am\s+not\s+able\s+to|'m\s+not\s+able\s+to"
    r"|am\s+unable\s+to|'m\s+unable\s+to)\s+(?:help|assist|comply|provide|create|write|generate|produce"
    r"|continue|fulfil+|do\s+that|do\s+this|engage|support|complete|participate|go\s+along)"
    r"|i\s+(?:do\s+not|don'?t)\s+feel\s+comfortable|unfortunately,?\s+i\s+(?:can(?:no|')t|cannot|won'?t)"
    r"|that'?s\s+not\s+something\s+i)",
    re.I,
)


def looks_like_refusal(text: str, *, anywhere: bool = False) -> bool:
    """True if ``text`` starts (or, with ``anywhere``, has a line or sentence starting) like a refusal."""
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    if _REFUSAL_STRICT.match(text):
        return True
    if anywhere:
        for piece in re.split(r"(?<=[.!?:\n])\s+", text[:600]):
            if _REFUSAL_STRICT.match(piece):
                return True
    return False


def normalise_span(text: str, part1: str) -> str:
    """Exactly one leading space when ``part1`` is non-empty, none when empty; no trailing space."""
    text = text.strip()
    if not text:
        return ""
    return " " + text if part1 else text


def _category_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower().replace("&", "and"))


@dataclass(frozen=True)
class ParsedOutput:
    """A parsed continuation. Only ``status == "ok"`` carries a usable violation."""

    status: ParseStatus
    steering: str = ""
    violation: str = ""
    category: str = ""
    model_category: str | None = None
    detail: str = ""


def _strip_echo(steering: str, part1: str) -> str:
    """Drop a repetition of part1 (whole, or its last sentence) at the start of the steering."""
    steering = steering.strip()
    if not steering:
        return steering
    steering = _LABEL.sub("", steering)
    head = part1.strip()
    if head and steering.startswith(head):
        return steering[len(head) :]
    tail = head[-120:].lstrip()
    if len(tail) >= 20 and steering.startswith(tail):
        return steering[len(tail) :]
    return steering


def _split_messy(text: str, notes: list[str]) -> tuple[str, str, str | None] | None:
    """Steering, violation and the model's category from an answer with irregular tags."""
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    opened = _OPEN.search(text)
    if opened:
        steering_raw = text[: opened.start()]
        rest = text[opened.end() :]
        closed = _CLOSE.search(rest)
        if closed:
            violation_raw = rest[: closed.start()]
            after = rest[closed.end() :]
        else:
            cat = _CATEGORY_OPEN.search(rest)
            violation_raw = rest[: cat.start()] if cat else rest
            after = rest[cat.start() :] if cat else ""
            notes.append("unclosed <harmful>")
        extra = len(_OPEN.findall(after))
        if extra:
            notes.append(f"ignored {extra} extra <harmful> span(s)")
    else:
        closed = _CLOSE.search(text)
        if not closed:
            return None
        steering_raw, violation_raw = "", text[: closed.start()]
        notes.append("missing <harmful>")
    found = _CATEGORY.search(text)
    said = " ".join(_ANY_TAG.sub(" ", found.group(1)).split()) if found else None
    return _ANY_TAG.sub(" ", steering_raw), _ANY_TAG.sub(" ", violation_raw), said


def parse_output(text: str, part1: str, category: str, finish_reason: str | None = "stop") -> ParsedOutput:
    """Parse a generator answer into steering + violation; see the module docstring for the rules."""
    if finish_reason == "content_filter":
        return ParsedOutput("refused", category=category, detail="finish_reason=content_filter")
    if finish_reason == "length":
        return ParsedOutput(
            "truncated", category=category, detail="finish_reason=length (max_tokens reached)"
        )
    notes: list[str] = []
    clean = _WELL_FORMED.fullmatch(text)  # the common case, without the slower general parser
    if clean:
        steering_raw, violation_raw, said = clean.group(1), clean.group(2), clean.group(3)
    else:
        split = _split_messy(text, notes)
        if split is None:
            if looks_like_refusal(text, anywhere=True):
                return ParsedOutput("refused", category=category, detail="refusal without <harmful>")
            return ParsedOutput("unparseable", category=category, detail="no <harmful> span")
        steering_raw, violation_raw, said = split

    steering = _strip_echo(steering_raw, part1).strip()
    violation = violation_raw.strip()
    if not violation:
        if looks_like_refusal(text, anywhere=True):
            return ParsedOutput("refused", category=category, detail="refusal with an empty <harmful> span")
        return ParsedOutput("unparseable", category=category, detail="empty <harmful> span")
    if looks_like_refusal(violation):
        return ParsedOutput("refused", category=category, detail="refusal inside <harmful>")
    if steering and looks_like_refusal(steering):
        return ParsedOutput("refused", category=category, detail="refusal before <harmful>")

    model_category = None
    if said:
        said = said.strip()
        if said and said != category and _category_key(said) != _category_key(category):
            model_category = said[:80]
            notes.append(f"model named category {model_category!r}")
    return ParsedOutput(
        "ok",
        steering=normalise_span(steering, part1),
        violation=normalise_span(violation, part1),
        category=category,
        model_category=model_category,
        detail="; ".join(notes),
    )
