"""Errors that stop a whole build (the CLI prints their message, exit 1, no traceback)."""

from __future__ import annotations


class BuildError(Exception):
    """The build cannot go on (bad source, unloadable tokenizer, fatal endpoint error)."""
