"""What every command module shares: the consoles, the error handling, JSON output, --split and
the root options (--debug, --version)."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kdctl import __version__
from kdctl.errors import KdctlError

# a pipe or CI log gets 120 columns rather than rich's 80, so that tables stay readable
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)

state = {"debug": False}

SPLIT_HELP = "train, val or all. COCO .json: the file itself; VOC sets without a val list use test."


def cli_errors(fn):
    """Run a command; a KdctlError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdctlError as exc:
            if state["debug"]:
                raise
            if os.environ.get("RANK", "0") == "0":  # in a distributed run, every rank fails alike: say it once
                err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


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


def write_json(path: Path, obj) -> None:
    """Write atomically (temp file + rename), so a failure never leaves half a file."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise KdctlError(f"{path}: folder {path.parent} does not exist; create it or choose another path")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def parse_split(value: str) -> Optional[str]:
    """The --split option as the library takes it: 'all' is None."""
    if value not in ("train", "val", "all"):
        raise KdctlError(f"--split: expected train, val or all, got {value!r}")
    return None if value == "all" else value
