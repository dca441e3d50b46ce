"""The one error family the CLI turns into a clean message and a non-zero exit.

Each message says what was expected, what came, and how to fix it. Subclasses name the domain.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 2, 60, 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6


def brief(value: Any) -> str:
    """repr of a value a user wrote, cut to a line: a message quotes what came, not kilobytes of it."""
    return _BRIEF.repr(value)


class AugsearchError(ValueError):
    """User-facing error: bad input, not a bug."""


class DatasetError(AugsearchError):
    """A dataset that does not fit the expected layout; carries the file, what was expected, what came, the fix."""

    def __init__(self, file: str | Path, expected: str, found: str, fix: str):
        self.file, self.expected, self.found, self.fix = str(file), expected, found, fix
        super().__init__(f"{file}: expected {expected}, found {found}. Fix: {fix}")


class PolicyError(AugsearchError):
    """A policy that cannot be built or used as asked; the message names the fix."""


class PolicyFileError(AugsearchError):
    """A policy file that cannot be read or does not describe a valid policy."""


class SearchError(AugsearchError):
    """A search that cannot start or resume: bad space, resources the cluster lacks, unreachable address."""
