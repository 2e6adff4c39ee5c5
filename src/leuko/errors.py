"""The one exception type a user can cause.

Everything raised as :class:`LeukoError` is printed by the CLI as a single
line and turned into a non-zero exit; anything else reaching the CLI is a bug
and keeps its traceback. Raise it deep, where the bad input is detected, with
a message that names the offending argument/file and what would be accepted.
"""

from __future__ import annotations


class LeukoError(Exception):
    """A problem with the user's input, data or environment (not a bug)."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class Refusal(LeukoError):
    """A request the lab service refuses, nothing changed: the HTTP status it answers with and one line.

    The store's and the upload checks' refusals are both this shape, so the service answers every one
    of them with one exception handler.
    """

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


__all__ = ["LeukoError", "Refusal"]
