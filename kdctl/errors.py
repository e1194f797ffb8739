"""Errors a user can cause. The CLI prints their one-line message and exits with code 2."""
from __future__ import annotations

from pathlib import Path


class KdctlError(Exception):
    """A problem with user input (recipe, file, argument): one line that says what and what to do."""


class RecipeError(KdctlError):
    """A recipe that does not validate; the message names the file and the dotted key."""


class DataError(KdctlError):
    """A dataset file that cannot be read; the message names the file (and line when known)."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")
