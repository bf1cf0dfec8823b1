"""The one error every command shares: a user error found after argument
parsing, reported as one line on stderr with exit code 2."""

from __future__ import annotations

__all__ = ["EXIT_USAGE", "UsageError"]

EXIT_USAGE = 2


class UsageError(Exception):
    """A user error found after argument parsing; one line, exit code 2."""
