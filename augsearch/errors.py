"""The one error family the CLI turns into a clean message and a non-zero exit.

Each message says what was expected, what came, and how to fix it. Subclasses name the domain.
"""


class AugsearchError(ValueError):
    """User-facing error: bad input, not a bug."""
