"""The one error of publishing."""

from __future__ import annotations


class PublishError(Exception):
    """A push that cannot (or must not) go ahead; ``exit_code`` 2 for bad input, 1 for Hub/auth failures."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
