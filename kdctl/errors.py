"""Errors a user can cause. The CLI prints their one-line message and exits with code 2.

Besides the exception classes, the few readers every user file goes through, so that a file
that is unreadable, not UTF-8 text or not YAML fails with one line naming it
(:func:`read_text`, :func:`load_yaml`), and :func:`os_problem`, the one wording of what the
operating system refused (disk full, permission denied, ...).
"""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Any


class KdctlError(Exception):
    """A problem with user input (recipe, file, argument): one line that says what and what to do."""


class RecipeError(KdctlError):
    """A recipe that does not validate; the message names the file and the dotted key."""


class DataError(KdctlError):
    """A dataset file that cannot be read; the message names the file (and line when known).

    ``DataError(message)`` with one argument is a plain message: that is how PyTorch's data
    loader rebuilds an exception raised in one of its worker processes."""

    def __init__(self, path: str | Path, problem: str | None = None, line: int | None = None):
        if problem is None:  # one argument: a finished message (rebuilt from a worker)
            self.path, self.line, self.problem = "", None, str(path)
            super().__init__(str(path))
            return
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        return (DataError, (self.path, self.problem, self.line) if self.path else (self.problem,))


class Terminated(BaseException):
    """SIGTERM (or another stop signal) arrived outside a training loop: raised from the signal
    handler so that every ``finally`` runs (temporary files are removed) before the CLI exits
    with ``128 + signum``. A BaseException, like KeyboardInterrupt, so that no ``except
    Exception`` swallows it."""

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)


# what to do about an errno, after the OS's own words
_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EFBIG: "the file is larger than this file system or the file-size limit (ulimit -f) allows; write elsewhere",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.EEXIST: "remove it or choose another path",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.ELOOP: "the path is a symbolic-link loop; check the path",
}


def os_problem(exc: OSError) -> str:
    """``"<what the OS said>; <what to do>"`` for an OSError (no path), e.g. ``No space left on
    device (disk full): the disk is full; free some space or write elsewhere``."""
    said = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        said = f"{said} (disk full)"
    advice = _ADVICE.get(exc.errno or -1)
    return f"{said}; {advice}" if advice else said


def os_error_line(exc: OSError, path: str | Path | None = None) -> str:
    """One line for an OSError: the path (``path``, else the one the exception carries) and
    :func:`os_problem`."""
    where = path if path is not None else exc.filename
    if where is not None and exc.filename2 is not None and path is None:
        where = f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {os_problem(exc)}" if where is not None else os_problem(exc)


def read_text(path: str | Path, what: str = "file", error: type[KdctlError] = KdctlError) -> str:
    """The UTF-8 text of a file a user gave; ``error`` (a KdctlError class taking one message)
    naming it when it cannot be read or is not UTF-8 text (``what`` says what it should be:
    "recipe", "split list", ...)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {os_problem(exc)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "save it as UTF-8") from None


def load_yaml(text: str, source: str | Path, what: str = "YAML file", error: type[KdctlError] = KdctlError) -> Any:
    """``yaml.safe_load(text)``; ``error`` (a KdctlError class taking one message) naming
    ``source`` (and the line) for bad YAML and for nesting too deep to read."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{source}{where}: {problem} (invalid {what}); fix the YAML syntax") from None
    except RecursionError:
        raise error(f"{source}: {what} is nested too deeply to read; flatten it") from None
