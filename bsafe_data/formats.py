"""Format strings a recipe carries (``output.dir``, ``control.format``): named plain fields only.

Python's ``str.format`` is a small language: ``{name.__class__}`` reads attributes, ``{name[0]}``
indexes, ``{x!r}`` converts and ``{x:>999999999}`` pads without bound. A recipe is data (it is
published with every dataset and rebuilt by others), so its format strings may only name the
fields their caller offers, as plain ``{field}``; literal braces are written ``{{`` and ``}}``.
``SafeFormat`` parses once (``string.Formatter().parse``), refuses everything else with a
``FormatError`` (a ``ValueError``, so recipe validation reports it as one problem), renders by
joining text and values (never ``str.format``) and compiles to a regex where a caller matches
rendered text.
"""

from __future__ import annotations

import re
import string
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache

#: The fields of ``control.format`` (``{x}`` required) and of ``output.dir``.
CONTROL_FIELDS = ("category", "x")
OUTPUT_DIR_FIELDS = ("name",)


class FormatError(ValueError):
    """A format string uses something other than its allowed plain fields."""


@dataclass(frozen=True)
class SafeFormat:
    """A parsed format string: ``pieces`` are (literal text, field name or None) in order."""

    text: str
    pieces: tuple[tuple[str, str | None], ...]

    @property
    def fields(self) -> frozenset[str]:
        """The field names it uses."""
        return frozenset(name for _, name in self.pieces if name is not None)

    def render(self, **values: object) -> str:
        """The text with each field replaced by ``str(value)`` (a missing value: ``FormatError``)."""
        out = []
        for literal, name in self.pieces:
            out.append(literal)
            if name is not None:
                if name not in values:
                    raise FormatError(f"no value for {{{name}}} in {self.text!r}")
                out.append(str(values[name]))
        return "".join(out)

    def regex(self, patterns: Mapping[str, str]) -> str:
        """A regex source matching rendered text: literal text escaped, each field replaced by
        ``patterns[field]`` (a regex fragment; the caller may name a group in it)."""
        out = []
        for literal, name in self.pieces:
            out.append(re.escape(literal))
            if name is not None:
                out.append(patterns[name])
        return "".join(out)


def parse_format(text: str, allowed: Collection[str], *, required: Collection[str] = ()) -> SafeFormat:
    """Parse ``text`` allowing only ``{field}`` for fields in ``allowed`` (and needing every one
    of ``required``); anything else raises ``FormatError`` naming what is wrong."""
    return _parse(text, frozenset(allowed), frozenset(required))


@lru_cache(maxsize=256)
def _parse(text: str, allowed: frozenset[str], required: frozenset[str]) -> SafeFormat:
    names = ", ".join(f"{{{n}}}" for n in sorted(allowed))
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise FormatError(f"invalid format string: {exc} (write a literal brace as {{{{ or }}}})") from None
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is None:
            pieces.append((literal, None))
            continue
        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if name == "" or name.isdigit():
            raise FormatError(f"positional field {field} is not allowed: use {names}")
        if any(c in name for c in ".[]"):
            raise FormatError(f"{field}: attribute and index access is not allowed, only {names}")
        if conversion or spec:
            raise FormatError(f"{field}: conversions and format specs are not allowed, only {names}")
        if name not in allowed:
            raise FormatError(f"unknown field {field}: only {names} may be used")
        pieces.append((literal, name))
    missing = sorted(required - {name for _, name in pieces if name is not None})
    if missing:
        raise FormatError(f"the format must contain {', '.join(f'{{{n}}}' for n in missing)}")
    return SafeFormat(text, tuple(pieces))


def control_format(text: str) -> SafeFormat:
    """A control signal format: ``{category}`` and ``{x}`` (required)."""
    return parse_format(text, CONTROL_FIELDS, required=("x",))


def output_dir(template: str, name: str) -> str:
    """``output.dir`` with ``{name}`` (the recipe name) filled in."""
    return parse_format(template, OUTPUT_DIR_FIELDS).render(name=name)
