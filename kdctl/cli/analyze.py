"""kdctl analyze-conflict: how far teachers' scores are from the student's assigned targets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from kdctl.cli.common import SKIP_BAD, SPLIT_HELP, cli_errors, err, out, parse_split, print_json, say, say_unreadable
from kdctl.errors import KdctlError


@cli_errors
def analyze_conflict_cmd(
    teacher: list[str] = typer.Option(..., "--teacher", help="A kdctl checkpoint of a teacher (repeatable); its stored recipe says what it is."),
    student: str = typer.Option(..., "--student", help="Recipe whose model.student gives the assigner, priors and targets (and the resize)."),
    data: Optional[str] = typer.Option(None, "--data", help="shapes, a COCO .json, a YOLO data.yaml, a VOC folder or a recipe (default: the student recipe's data)."),
    student_checkpoint: Optional[str] = typer.Option(None, "--student-checkpoint", help="A (distilled) student: also measure its own and its cross-head predictions against each teacher."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field of the student recipe: --set runtime.threads=1 (repeatable)."),
    split: str = typer.Option("val", "--split", help=SPLIT_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: the recipe's runtime.device)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per batch (default: the recipe's eval.batch_size)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Use only the first N images."),
    threshold: float = typer.Option(0.5, "--threshold", help="A location conflicts when its discrepancy is above this."),
    floor: float = typer.Option(0.05, "--floor", help="Non-trivial: the target or the teacher's score exceeds this."),
    per_class: bool = typer.Option(False, "--per-class", help="Every (location, class) pair is a unit, instead of the max over classes per location."),
    quality: str = typer.Option("teacher", "--quality", help="GFL students' soft target: IoU of the teacher's box, the student's own box (with --student-checkpoint) or one (one-hot)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the histograms and the conflict ratio per level as PNG."),
    visualize: int = typer.Option(0, "--visualize", min=0, help="Write N images of target / teacher score / discrepancy maps (needs --out)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the --visualize images."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    skip_bad: bool = SKIP_BAD,
) -> None:
    """Measure how far each teacher's scores are from the targets the student's assigner gives (CrossKD's target conflict).

    Example: [bold]kdctl analyze-conflict --teacher runs/gfl/best.safetensors --teacher runs/retina/best.safetensors --student demo --plot conflict.png[/]
    """
    from kdctl.analysis.analyze import analyze_conflict

    check_outputs(json_out, plot, visualize, out_dir, force)
    report, samples = analyze_conflict(
        teacher, student, data, student_checkpoint=student_checkpoint, overrides=overrides, split=parse_split(split),
        device=device, batch_size=batch_size, max_images=max_images, threshold=threshold, floor=floor,
        per_class=per_class, quality=quality, visualize=visualize, skip_bad=skip_bad)
    if plot is not None:
        from kdctl.analysis.plot import plot_report

        plot_report(report, plot)
    if visualize:
        from kdctl.analysis.plot import write_visualizations

        report["visualizations"] = [str(p) for p in write_visualizations(samples, out_dir, report)]
    if json_out is not None and str(json_out) == "-":
        return print_json(report)
    say_unreadable(report["data"]["unreadable"])
    render_conflict(report)
    if json_out is not None:
        from kdctl.artifact.checkpoint import atomic_write_bytes

        atomic_write_bytes(json_out, (json.dumps(report, indent=2) + "\n").encode())
    for written in [p for p in (json_out, plot) if p is not None] + ([out_dir] if visualize else []):
        say(out, "wrote", "green", str(written))


def check_outputs(json_out: Optional[Path], plot: Optional[Path], visualize: int, out_dir: Optional[Path], force: bool) -> None:
    """Refuse, before the long measurement, outputs that would overwrite files or land nowhere."""
    if visualize and out_dir is None:
        raise KdctlError("--visualize N needs --out DIR: the folder for the images")
    from kdctl.artifact.rundir import check_writable_target

    for target in (json_out if json_out is not None and str(json_out) != "-" else None, plot):
        if target is not None:
            check_writable_target(target, force, "--json / --plot")
        if target is not None and not target.parent.exists():
            raise KdctlError(f"{target}: folder {target.parent} does not exist; create it or choose another path")
    if visualize and out_dir.exists() and any(out_dir.glob("conflict_*.png")) and not force:
        raise KdctlError(f"{out_dir}: already holds conflict_*.png images; pass --force to overwrite them or choose another folder")


def render_conflict(report: dict) -> None:
    from kdctl.analysis.tables import tables

    for table in tables(report):
        out.print(table)
    for t in report["teachers"]:
        for note in t["notes"]:
            say(err, "note", "cyan", f"{t['label']}: {note}")
