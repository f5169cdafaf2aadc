"""Text from data made harmless for a terminal (file names, row text, messages about them)."""

from __future__ import annotations

import re

# C0 and C1 control characters (ESC, BEL, CSI, OSC, ...) except newline and tab.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def one_line(text: object) -> str:
    """``safe`` text on one line: newlines and tabs shown as ``\\n`` and ``\\t`` too."""
    return safe(text).replace("\n", "\\n").replace("\t", "\\t")


def safe(text: object) -> str:
    """Data text made harmless for a terminal: control characters shown as ``\\xNN``."""
    return _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group(0)):02x}", str(text))
