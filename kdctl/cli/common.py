"""What every command module shares: the consoles, the one error path, JSON output, --split and
the root options (--debug, --version).

The error path (:func:`cli_errors`): whatever a command raises ends in exactly one line on
stderr and an exit code (README, "Safety"):

- 2: the user's input: :class:`kdctl.errors.KdctlError`, an OSError (the path and what the OS
  said: disk full says disk full), a file that is not UTF-8 text, bad YAML or JSON, nesting too
  deep to read, out of memory, and any of these raised inside a data-loader worker;
- 128 + N: stopped by signal N (130 Ctrl-C, 143 SIGTERM): SIGTERM raises
  :class:`kdctl.errors.Terminated` so that every ``finally`` runs and no temporary file stays;
- 1: a bug in kdctl (anything else): the line says so and how to report it.

``kdctl --debug ...`` re-raises instead, with the traceback. Messages, paths and other user
strings are never read as rich markup: print them with :func:`say` or escape them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
import threading
import unicodedata
from pathlib import Path
from typing import Optional

import typer
import typer.core
from typer.core import TyperGroup
from rich.console import Console
from rich.text import Text

from kdctl.version import __version__
from kdctl.errors import KdctlError, Terminated, os_error_line

# a pipe or CI log gets 120 columns rather than rich's 80, so that tables stay readable
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)

state = {"debug": False}

SPLIT_HELP = "train, val or all. COCO .json: the file itself; VOC sets without a val list use test."

REPORT = ("this is a bug in kdctl, not a problem with your input; please report it with the command and "
          "the output of `kdctl --debug` followed by the same command")

# exception types (by name, as a data-loader worker reports them) that are the user's input
_USER_TYPES = {"UnicodeDecodeError", "DecompressionBombError", "RecursionError", "MemoryError", "JSONDecodeError",
               "YAMLError", "ScannerError", "ParserError", "ComposerError", "ConstructorError", "OSError",
               "FileNotFoundError", "PermissionError", "IsADirectoryError", "NotADirectoryError", "UnidentifiedImageError"}
# typer >= 0.20 parses with its own copy of click; its exceptions are that copy's
_click = getattr(typer.core, "_click", None) or __import__("click")
_WORKER = re.compile(r"^Caught (?P<type>\w+) in DataLoader worker process (?P<n>\d+)\.")
_WORKER_KILLED = re.compile(r"DataLoader worker .*? is killed by signal: (?P<sig>[A-Za-z]+(?: [A-Za-z]+)*)")


def one_line(text: str) -> str:
    """``text`` as one printable line: control characters (a newline in a file name too) written
    as escapes (``\\n``), undecodable file-name bytes (surrogates) as ``\\udcNN``."""
    shown = "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cs") else c for c in str(text).strip())
    return shown.encode("utf-8", "backslashreplace").decode("utf-8")


def say(console: Console, tag: str, style: str, text: str) -> None:
    """Print ``tag`` (styled) and ``text`` (never read as markup) as one line on ``console``."""
    console.print(Text(tag, style=style) + Text(" " + one_line(text)), soft_wrap=True)


def _from_worker(exc: BaseException) -> tuple[str, str] | None:
    """(original exception type name, its message) when ``exc`` is PyTorch's re-raise of an
    exception from a data-loader worker (``Caught X in DataLoader worker process N.``)."""
    text = str(exc)
    m = _WORKER.match(text)
    if m is None:
        return None
    name = m["type"]
    for line in reversed(text.splitlines()):
        head, sep, rest = line.partition(": ")
        if sep and head.split(".")[-1] == name:
            return name, rest.strip()
    return name, ""


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that ended a command; see the module docstring."""
    if isinstance(exc, Terminated):
        return 128 + exc.signum, (f"stopped by {signal.Signals(exc.signum).name}; nothing was half-written "
                                  "(files being written were removed)")
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT, "interrupted (SIGINT); nothing was half-written (files being written were removed)"
    killed = _WORKER_KILLED.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if killed is not None:  # PyTorch's SIGCHLD handler saw a data-loader worker die by a signal
        name = killed["sig"]
        if name in ("Terminated", "Interrupt"):
            signum = signal.SIGTERM if name == "Terminated" else signal.SIGINT
            return 128 + signum, f"stopped by {signal.Signals(signum).name}; nothing was half-written"
        return 2, (f"a data-loader worker was killed by signal {name} (out of memory?); lower data.num_workers or "
                   "data.batch_size")
    worker = _from_worker(exc)
    if worker is not None:
        name, message = worker
        if isinstance(exc, (KdctlError, OSError)) or name in _USER_TYPES:
            return 2, f"{message or name} (in a data-loader worker)"
        return 1, f"internal error in a data-loader worker: {name}: {message}; {REPORT}"
    if isinstance(exc, KdctlError):
        return 2, str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return 2, f"an input is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    if isinstance(exc, OSError):
        return 2, os_error_line(exc)
    if isinstance(exc, json.JSONDecodeError):
        return 2, f"invalid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}); fix the file"
    if type(exc).__module__.startswith("yaml"):
        return 2, f"invalid YAML ({one_line(str(exc))}); fix the file"
    if isinstance(exc, RecursionError):
        return 2, "an input is nested too deeply to read; flatten it"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        first = (str(exc).splitlines() or [""])[0]
        return 2, f"out of memory ({first[:160] or type(exc).__name__}); use smaller inputs or a smaller data.batch_size"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return 1, f"internal error: {type(exc).__name__}: {first}; {REPORT}"


_STOPPED_BY: list[int] = []  # the stop signals that reached this process during a command
RESEND_S = 0.05  # a stop signal held during an import is sent again this often


def _in_import(frame) -> bool:
    """Whether ``frame`` (where a signal handler interrupted the main thread) runs inside an
    import: some frame of its stack is importlib's."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def stop_signals_raise():
    """While a command runs, SIGTERM raises :class:`Terminated` and SIGINT (Ctrl-C) raises
    KeyboardInterrupt in this process, so that temporary files are removed on the way out.

    SIGINT is set here, not left to Python: a process started in the background by a shell
    script inherits SIGINT ignored, and Python then never installs its Ctrl-C handler (an
    export ran on and wrote its file after ``kill -INT``). A forked child (a data-loader worker)
    that inherits the handlers dies by the signal as usual.

    A signal that arrives while a module is being imported (the commands import torch, onnx and
    the exporter lazily; under load that takes seconds) is held until the import is done: it is
    sent again every :data:`RESEND_S` seconds and raises at the first one outside an import. An
    exception raised into the middle of an extension module's initialisation can leave it half
    built: once, in the test suite, an export interrupted that way died of SIGSEGV instead of
    printing its one line."""
    if sys.platform == "win32" or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield  # someone (an embedding program, a test harness) handles SIGTERM already
        return
    owner = os.getpid()
    active = True  # a held signal is sent again only while this block runs

    def handle(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _STOPPED_BY.append(signum)
        if _in_import(frame):
            resend = threading.Timer(RESEND_S, lambda: active and os.kill(owner, signum))
            resend.daemon = True
            resend.start()
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    try:
        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        active = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cli_errors(fn):
    """Run a command through the one error path (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _STOPPED_BY.clear()
        try:
            with stop_signals_raise():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, _click.exceptions.ClickException, SystemExit):
            raise
        except BaseException as exc:
            if state["debug"]:
                raise
            # a stop signal that lands inside an import (torch's takes seconds) can surface as
            # any exception of the half-imported module: the signal is what ended the command
            if _STOPPED_BY:
                exc = KeyboardInterrupt() if _STOPPED_BY[0] == signal.SIGINT else Terminated(_STOPPED_BY[0])
            code, line = describe(exc)
            if os.environ.get("RANK", "0") == "0":  # in a distributed run, every rank fails alike: say it once
                say(err, "error:", "bold red", line)
            raise typer.Exit(code) from None

    return wrapper


class OneLineErrors(TyperGroup):
    """The root command group: a usage error (an unknown option, a value out of range, a missing
    argument) is one line on stderr and exit 2 as well, naming the option and the help to read."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.exceptions.NoArgsIsHelpError:
            return super().main(args, prog_name, complete_var, standalone_mode=True, **extra)  # the help, as usual
        except _click.exceptions.ClickException as exc:
            where = getattr(exc, "ctx", None)
            hint = f"; see `{where.command_path} --help`" if where is not None else ""
            say(err, "error:", "bold red", f"{exc.format_message()}{hint}")
            sys.exit(exc.exit_code)
        except typer.Abort:
            say(err, "error:", "bold red", "aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _version(value: bool) -> None:
    if value:
        out.print(f"kdctl {__version__}")
        raise typer.Exit()


def root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """kdctl: teacher in, small exported student out. Start with `kdctl recipes list`."""
    state["debug"] = debug


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def write_json(path: Path, obj, *, force: bool = False) -> None:
    """Write atomically (temp file + rename), so a failure never leaves half a file; an existing
    file is replaced only with ``force``."""
    from kdctl.artifact.rundir import atomic_write_bytes, check_writable_target

    path = Path(path)
    if path.parent and not path.parent.exists():
        raise KdctlError(f"{path}: folder {path.parent} does not exist; create it or choose another path")
    check_writable_target(path, force, option="the output")
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


SKIP_BAD = typer.Option(False, "--skip-bad", help="Skip unreadable images (counted and named) instead of failing, as data.skip_bad does.")


def say_unreadable(rows: list[dict]) -> None:
    """Name the images skipped as unreadable (``[{"file", "reason"}]``): the first 20, then a count."""
    for item in rows[:20]:
        say(err, "skipped", "yellow", f"{item['file']}: {item['reason']}")
    if len(rows) > 20:
        say(err, "skipped", "yellow", f"{len(rows) - 20} more unreadable images")
    if rows:
        say(err, "skipped", "yellow", f"{len(rows)} unreadable image{'s' * (len(rows) != 1)} in all (data.skip_bad)")


def parse_split(value: str) -> Optional[str]:
    """The --split option as the library takes it: 'all' is None."""
    if value not in ("train", "val", "all"):
        raise KdctlError(f"--split: expected train, val or all, got {value!r}")
    return None if value == "all" else value
