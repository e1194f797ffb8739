"""kdctl fetch: published teachers into kdctl checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kdctl.cli.common import cli_errors, err, out, print_json, say


@cli_errors
def fetch_cmd(
    target: Optional[str] = typer.Argument(None, metavar="[NAME|URL]", help="A teacher of `kdctl fetch --list`, or a URL (with --sha256)."),
    list_: bool = typer.Option(False, "--list", help="Show the built-in teacher registry."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected SHA-256 of the file (full 64 hex digits, or a prefix of at least 8)."),
    from_file: Optional[Path] = typer.Option(None, "--from-file", help="Convert a local file instead of downloading (offline); needs --as."),
    as_name: Optional[str] = typer.Option(None, "--as", help="The registry entry whose architecture the file or URL holds."),
    force: bool = typer.Option(False, "--force", help="Download and convert again even if the teacher is in the cache."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Download a published COCO teacher (torchvision, MMDetection), verify it and convert it to a kdctl checkpoint.

    The checkpoint lands in $KDCTL_HOME/teachers (default ~/.cache/kdctl) and works with
    `kdctl eval CKPT` and `kdctl distill RECIPE --teacher CKPT`.

    Example: [bold]kdctl fetch gfl_r101_fpn_mstrain_2x_coco[/]
             [bold]kdctl fetch --from-file retinanet_resnet50_fpn_coco-eeacb38b.pth --as retinanet_resnet50_fpn[/]
    """
    from kdctl.hub import registry_rows

    if list_:
        rows = registry_rows()
        if as_json:
            return print_json(rows)
        return render_registry(rows)
    from kdctl.hub.fetch import fetch

    info = fetch(target, sha256=sha256, from_file=from_file, as_name=as_name, force=force, progress=not as_json)
    if as_json:
        return print_json(info)
    render_fetched(info)


def render_registry(rows: list[dict]) -> None:
    table = Table(title="teachers (COCO val2017 box AP as published)", title_justify="left")
    for i, col in enumerate(("name", "source", "detector", "backbone", "schedule", "AP", "size")):
        table.add_column(col, no_wrap=i > 0, overflow="fold", justify="right" if col in ("AP", "size") else "left")
    for r in rows:
        size = "—" if r["size_mb"] is None else f"{r['size_mb']:.0f} MB"
        table.add_row(r["name"], r["source"], r["detector"], r["backbone"], r["schedule"], f"{r['box_ap']:.1f}", size)
    out.print(table)
    err.print("hashes: the publishers give only the first 8 hex digits of each file's SHA-256 (in its name); "
              "kdctl checks those", soft_wrap=True)


def render_fetched(info: dict) -> None:
    if info["cached"]:
        say(out, "cached", "green", f"{info['name']}: {info['path']} (--force to fetch again)")
        return
    how = "downloaded" if info["downloaded"] else "read"
    check = "SHA-256" if info["checked"] == "sha256" else f"SHA-256 prefix {info['sha256'][:8]}"
    say(out, "converted", "green", f"{info['name']}: {how} {info['file']} ({check} ok), "
                                   f"{info['params'] / 1e6:.1f}M parameters -> {info['path']}")
    out.print(f"use it: kdctl eval {info['path']} --data DATA · kdctl distill RECIPE --teacher {info['path']}",
              soft_wrap=True, markup=False)
