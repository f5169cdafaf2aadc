"""Errors that stop a whole build (the CLI prints their message, exit 1, no traceback)."""

from __future__ import annotations


class BuildError(Exception):
    """The build cannot go on (bad source, unloadable tokenizer, fatal endpoint error)."""


class BuildStopped(BuildError):
    """The build stopped on purpose and a re-run goes on (its calls were exported for an offline
    engine): the CLI exits 4."""
