"""Helpers the CLI tests share (importable as ``helpers``: pytest puts ``tests/`` on the path)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from kdctl.cli import app


def run(*args):
    """``kdctl ARGS...`` in-process; the typer ``Result`` (``exit_code``, ``output``)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def json_of(result):
    """The JSON document a ``--json`` command printed (after any leading log lines)."""
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def assert_one_line_error(result, *needles):
    """Exit 2 and exactly one ``error:`` line containing every needle."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
