"""kdctl predict: a model file over images, videos or a dataset's images; pictures, JSON, labels."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kdctl.cli.common import SPLIT_HELP, cli_errors, err, out, parse_split, print_json, say


@cli_errors
def predict_cmd(
    model: Path = typer.Argument(..., help="A kdctl checkpoint or run directory, an exported .safetensors, an .onnx (raw or --end-to-end) or a .torchscript.pt."),
    sources: Optional[list[str]] = typer.Argument(None, metavar="SOURCE...", help="Image files, folders (searched recursively), glob patterns ('**' recursive; quote them) or videos (needs PyAV: pip install 'kdctl\\[video]')."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder; must be new unless --force (default: runs/predict, or runs/predict-2, -3 ... when taken)."),
    data: Optional[str] = typer.Option(None, "--data", help="Predict on a dataset's images instead (its labels are not read): shapes, a COCO .json, a YOLO data.yaml, a VOC folder or a recipe."),
    split: str = typer.Option("val", "--split", help=f"With --data: {SPLIT_HELP}"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Stop after this many images (or video frames)."),
    conf: Optional[float] = typer.Option(None, "--conf", help="Score threshold, 0..1 (default 0.25)."),
    iou: Optional[float] = typer.Option(None, "--iou", help="Class-wise NMS IoU, 0..1 (default: the model file's)."),
    max_det: Optional[int] = typer.Option(None, "--max-det", min=1, help="Detections per image at most (default: the model file's, 100)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Keep only these classes, in this order (comma-separated names); --save-labels numbers them in this order."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per inference batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    input_size: Optional[tuple[int, int]] = typer.Option(None, "--input-size", metavar="H W", help="Every image is letterboxed to H x W (multiples of 32; an exported graph takes only its own size). Default: the model file's."),
    save_labels: bool = typer.Option(False, "--save-labels", help="Also write the images, YOLO label files and a data.yaml: the folder becomes a dataset kdctl trains on (pseudo-labels)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on an unreadable image instead of skipping and listing it."),
    force: bool = typer.Option(False, "--force", help="Replace --out when an earlier kdctl predict wrote it."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (files, counts, img/s, skipped images)."),
) -> None:
    """Detect objects in images with any kdctl model file; write each image with its boxes drawn, predictions.json and (--save-labels) a YOLO dataset.

    Example: [bold]kdctl predict demo-out/crosskd.onnx photos/ --out runs/photos[/]
             [bold]kdctl predict runs/teacher/best.safetensors unlabelled/ --save-labels --conf 0.4 --out runs/pseudo[/]
             [bold]kdctl predict runs/shapes/best.safetensors --data shapes --split val --limit 8[/]
    """
    from kdctl.predict import predict

    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    result = predict(model, sources or [], data=data, split=parse_split(split) if data else None, limit=limit, out=out_dir,
                     conf=conf, iou=iou, max_det=max_det, classes=names, batch_size=batch_size, device=device,
                     input_size=input_size, save_labels=save_labels, strict=strict, force=force, progress=not as_json)
    if as_json:
        return print_json(result)
    render_predict(result)


def render_predict(r: dict) -> None:
    for item in r["skipped"][:20]:
        say(err, "skipped", "yellow", f"{item['file']}: {item['reason']}")
    if len(r["skipped"]) > 20:
        say(err, "skipped", "yellow", f"{len(r['skipped']) - 20} more (all in predictions.json)")
    table = Table(title=f"predict · {r['kind']} · {r['input_size'][0]}x{r['input_size'][1]} · {r['device']}", title_justify="left")
    for name in ("images", "boxes", "skipped", "img/s", "model img/s", "conf", "iou", "max det"):
        table.add_column(name, justify="right")
    table.add_row(str(r["images"]), str(r["boxes"]), str(len(r["skipped"])), f"{r['img_s']:.1f}", f"{r['model_img_s']:.1f}",
                  f"{r['conf']:g}", f"{r['iou']:g}", str(r["max_det"]))
    out.print(table)
    if r["out_chosen"] == "numbered":
        say(err, "note", "cyan", f"runs/predict was taken: writing to {r['out']}")
    w = r["written"]
    say(out, "wrote", "green", f"{w['drawn']}/ (pictures) and {w['predictions']}")
    if "data_yaml" in w:
        say(out, "wrote", "green", f"{w['data_yaml']}: a YOLO dataset of these pseudo-labels "
                                   f"(kdctl train / distill with data.format: yolo, data.path: {w['data_yaml']})")
