"""One error type for everything a user can get wrong, so the CLI can print one line and exit 2."""

from __future__ import annotations

import difflib
from typing import Iterable


class LabError(Exception):
    """A user-facing error: which file, which field, what is allowed. Never shown as a traceback."""

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None):
        self.file = file
        self.path = path
        self.message = message
        super().__init__(self.render())

    def render(self) -> str:
        where = ": ".join(p for p in (self.file, self.path) if p)
        return f"{where}: {self.message}" if where else self.message


class SpecError(LabError):
    """A spec that cannot be loaded, resolved or validated."""


def close_matches(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for a mistyped key, or ''."""
    found = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"
