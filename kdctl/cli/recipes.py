"""kdctl recipes list / show / validate."""
from __future__ import annotations

import sys

import typer
from rich.table import Table

from kdctl.cli.common import cli_errors, out, print_json, say

app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)


@app.command("list")
@cli_errors
def recipes_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the built-in recipes.

    Example: [bold]kdctl recipes list[/]
    """
    from kdctl.errors import load_yaml, read_text
    from kdctl.recipe import builtin_recipes

    rows = []
    for name, path in builtin_recipes().items():
        raw = load_yaml(read_text(path, "recipe"), path, "recipe") or {}
        raw = raw if isinstance(raw, dict) else {}
        rows.append({"name": name, "path": str(path), "description": str(raw.get("description", ""))})
    if as_json:
        return print_json(rows)
    render_recipes(rows)


def render_recipes(rows: list[dict]) -> None:
    table = Table("recipe", "description", title="built-in recipes")
    for row in rows:
        table.add_row(row["name"], row["description"])
    out.print(table)


@app.command("show")
@cli_errors
def recipes_show(
    name: str = typer.Argument(..., help="Built-in recipe name or recipe file."),
    resolved: bool = typer.Option(False, "--resolved", help="Merge `extends`, apply --set and fill every default."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field: --set train.epochs=24 (repeatable)."),
) -> None:
    """Print a recipe as written, or fully resolved with --resolved.

    Example: [bold]kdctl recipes show shapes --resolved --set train.epochs=2[/]
    """
    from kdctl.recipe import find_recipe, load_recipe

    if resolved or overrides:
        sys.stdout.write(load_recipe(name, overrides).to_yaml())
    else:
        from kdctl.errors import read_text

        path = find_recipe(name)
        sys.stdout.write(read_text(path, "recipe"))


@app.command("validate")
@cli_errors
def recipes_validate(
    file: str = typer.Argument(..., help="Recipe file (or built-in name)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field: --set data.batch_size=4 (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (the resolved recipe)."),
) -> None:
    """Check a recipe against the schema; print what is wrong in one line (exit 2) or 'ok'.

    Example: [bold]kdctl recipes validate my_recipe.yaml --set train.lr=0.02[/]
    """
    from kdctl.recipe import load_recipe

    recipe = load_recipe(file, overrides)
    if as_json:
        return print_json({"valid": True, "recipe": recipe.model_dump(mode="json")})
    say(out, "ok", "green", file)


@app.command("families")
@cli_errors
def recipes_families(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the detector families a recipe's model.*.head can name.

    Example: [bold]kdctl recipes families[/]
    """
    from kdctl.models.families import FAMILIES

    rows = [{"head": f.name, "summary": f.summary, "priors": "points" if f.anchors is None else "anchors",
             "assigner": f.assigner, "nms_iou": f.nms_iou, "norm": f.norm, "box_losses": list(f.box_losses),
             "crosskd_reuse_idx": f.reuse_idx, "capabilities": sorted(f.capabilities)} for f in FAMILIES.values()]
    if as_json:
        return print_json(rows)
    table = Table("head", "family", "priors", "assigner", "NMS IoU", "box_loss", "CrossKD reuse_idx", "KD capabilities",
                  title="detector families (model.*.head)")
    for r in rows:
        table.add_row(r["head"], r["summary"], r["priors"], r["assigner"], f"{r['nms_iou']:g}",
                      " | ".join(r["box_losses"]), str(r["crosskd_reuse_idx"]), ", ".join(r["capabilities"]))
    out.print(table)
