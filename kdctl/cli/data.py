"""kdctl data stats / export-coco."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kdctl.cli.common import SKIP_BAD, SPLIT_HELP, cli_errors, err, one_line, out, parse_split, print_json, say

app = typer.Typer(help="Inspect and convert datasets.", no_args_is_help=True)

DATA = typer.Argument(..., help="shapes, a COCO .json, a YOLO data.yaml, a VOC folder or a recipe.")
SPLIT = typer.Option("all", "--split", help=SPLIT_HELP)


@app.command("stats")
@cli_errors
def data_stats(
    data: str = DATA,
    split: str = SPLIT,
    skip_bad: bool = SKIP_BAD,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Images, boxes, classes, box-size histogram and what loading repaired.

    Example: [bold]kdctl data stats ../shared/data/coco8/data.yaml --split val[/]
    """
    from kdctl.data import open_dataset

    with err.status(f"loading {escape(one_line(data))}"):
        ds = open_dataset(data, parse_split(split), skip_bad=skip_bad, check_images="auto")
        stats = ds.stats()
    if as_json:
        return print_json(stats)
    render_stats(stats)


def render_stats(stats: dict) -> None:
    summary = Table.grid(padding=(0, 2))
    summary.add_row("source", Text(f"{one_line(stats['source'])} ({stats['format']})"))
    summary.add_row("images", f"{stats['images']} ({stats['images_without_boxes']} without boxes)")
    summary.add_row("boxes", f"{stats['boxes']} (+{stats['ignore_regions']} ignore regions)")
    summary.add_row("classes", str(stats["classes"]))
    sizes = stats["coco_sizes"]
    summary.add_row("COCO sizes", f"small {sizes['small']} · medium {sizes['medium']} · large {sizes['large']}")
    rep = stats["repairs"]
    summary.add_row("repaired", f"{rep['boxes_clipped']} boxes clipped · {rep['boxes_degenerate_dropped']} degenerate dropped · {rep['samples_skipped']} samples skipped")
    out.print(summary)
    hist = Table("box side √area (px)", "boxes", "", title="box sizes", title_justify="left")
    peak = max(stats["size_histogram"].values(), default=0) or 1
    for edge, n in stats["size_histogram"].items():
        hist.add_row(edge, str(n), "█" * round(30 * n / peak))
    out.print(hist)
    per = Table("class", "boxes", title="boxes per class", title_justify="left")
    for name, n in sorted(stats["per_class"].items(), key=lambda kv: -kv[1]):
        per.add_row(Text(one_line(name)), str(n))  # class names are text, not markup
    out.print(per)
    for note in rep["notes"]:
        say(err, "note", "cyan", note)
    for item in rep["skipped"][:20]:
        say(err, "skipped", "yellow", f"{item['file']}: {item['reason']}")


@app.command("export-coco")
@cli_errors
def data_export_coco(
    data: str = DATA,
    out_path: Path = typer.Argument(..., metavar="OUT", help="COCO JSON file to write."),
    split: str = SPLIT,
    skip_bad: bool = SKIP_BAD,
    force: bool = typer.Option(False, "--force", help="Overwrite OUT, and the images written beside it (shapes), if they exist."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Keep only these classes, in this order (comma-separated names); boxes of the others are dropped."),
) -> None:
    """Write any supported dataset as COCO JSON (shapes also writes its images as PNG next to it).

    Example: [bold]kdctl data export-coco shapes out/shapes_val.json --split val[/]
             [bold]kdctl data export-coco demo my-data/train.json --classes star,circle[/]
    """
    from kdctl.data import open_dataset
    from kdctl.data.export import export_coco
    from kdctl.artifact.rundir import check_writable_target

    check_writable_target(out_path, force)  # before the dataset is read; the images are checked by export_coco
    ds = open_dataset(data, parse_split(split), skip_bad=skip_bad)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    result = export_coco(ds, out_path, names, force=force)
    where = f"; images in {result['image_dir']}" if result.get("image_dir") else ""
    say(out, "wrote", "green", f"{out_path}: {result['images']} images, {result['annotations']} annotations, "
                               f"{result['categories']} categories{where}")
