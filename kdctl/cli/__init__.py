"""The ``kdctl`` command line: parse, call one function, render the result.

Errors a user can cause raise :class:`kdctl.errors.KdctlError`; :func:`kdctl.cli.common.cli_errors`
turns them into one red line on stderr and exit code 2 (``kdctl --debug ...`` shows the traceback
instead).

One module per command group; each keeps its library imports inside the commands, so that
``kdctl --help`` imports no more than typer and rich.
"""
from __future__ import annotations

import typer

from kdctl.cli import analyze, data, evaluate, export, fetch, predict, recipes, train
from kdctl.cli.common import OneLineErrors, root

app = typer.Typer(
    name="kdctl",
    help="Make small, fast object detectors by knowledge distillation from big ones.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    cls=OneLineErrors,  # usage errors are one line too
)
app.callback()(root)

# `kdctl --help` lists the commands in this order, then the groups
app.command("train")(train.train_cmd)
app.command("distill")(train.distill_cmd)
app.command("compare")(train.compare_cmd)
app.command("fetch")(fetch.fetch_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command("export")(export.export_cmd)
app.command("predict")(predict.predict_cmd)
app.command("analyze-conflict")(analyze.analyze_conflict_cmd)
app.add_typer(recipes.app, name="recipes")
app.add_typer(data.app, name="data")

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
