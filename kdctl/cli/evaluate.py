"""kdctl eval: COCO box metrics of a checkpoint or a predictions file."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from kdctl.cli.common import SKIP_BAD, SPLIT_HELP, cli_errors, err, out, parse_split, print_json, say, say_unreadable, write_json
from kdctl.errors import KdctlError


@cli_errors
def eval_cmd(
    checkpoint: Optional[Path] = typer.Argument(None, help="A kdctl checkpoint (.safetensors) or run directory, or an exported .onnx / .torchscript.pt (run through its own runtime); omit with --predictions."),
    data: Optional[str] = typer.Option(None, "--data", help="Ground truth: a COCO .json, a YOLO data.yaml, a VOC folder, shapes or a recipe (default for a checkpoint: its recipe's data)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="COCO results JSON: [{image_id, category_id, bbox [x,y,w,h], score}]."),
    split: str = typer.Option("val", "--split", help=SPLIT_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics as JSON to this file ('-' for stdout)."),
    save_predictions: Optional[Path] = typer.Option(None, "--save-predictions", help="Write the checkpoint's detections as COCO results JSON."),
    per_class: bool = typer.Option(False, "--per-class", help="Add AP per class."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per inference batch (default: the recipe's eval.batch_size)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads for an .onnx MODEL (default: torch's)."),
    skip_bad: bool = SKIP_BAD,
) -> None:
    """COCO box metrics (AP, AP50, AP75, APs/m/l, AR1/10/100) of a checkpoint or a predictions file.

    Examples: [bold]kdctl eval runs/shapes/best.safetensors --data shapes[/]
              [bold]kdctl eval demo-out/crosskd.onnx[/]  (an exported file, on the data of the recipe stored in it)
              [bold]kdctl eval --data instances_val2017.json --predictions dets.json --per-class[/]
    """
    if (checkpoint is None) == (predictions is None):
        raise KdctlError("give either a CHECKPOINT or --predictions FILE (not both, not neither)")
    if save_predictions is not None and save_predictions.exists():
        raise KdctlError(f"{save_predictions}: already exists; remove it or choose another path")
    if json_out is not None and str(json_out) != "-" and json_out.exists():
        raise KdctlError(f"{json_out}: already exists; remove it or choose another path")
    if predictions is not None:
        from kdctl.evaluation.box_map import evaluate_data

        if data is None:
            raise KdctlError("--predictions needs --data: the ground truth to score them against")
        with err.status("evaluating"):
            result = evaluate_data(data, predictions, split=parse_split(split), per_class=per_class)
    else:
        from kdctl.evaluation.inference import evaluate_checkpoint, evaluate_model_file

        if split == "all":
            raise KdctlError("--split: a checkpoint is evaluated on train or val, not all")
        if checkpoint.name.lower().endswith((".onnx", ".pt")):  # an exported graph: through its own runtime
            from kdctl.export.model_file import load_model_file

            model = load_model_file(checkpoint, device=device, threads=threads)
            result = evaluate_model_file(model, data, split=split, batch_size=batch_size, per_class=per_class,
                                         skip_bad=skip_bad)
        else:
            result = evaluate_checkpoint(checkpoint, data, split=split, device=device, batch_size=batch_size,
                                         per_class=per_class, skip_bad=skip_bad)
        preds = result.pop("predictions")
        if save_predictions is not None:
            write_json(save_predictions, preds)
    if json_out is not None and str(json_out) == "-":
        return print_json(result)
    say_unreadable(result.get("unreadable", []))
    render_metrics(result, per_class)
    if json_out is not None:
        write_json(json_out, result)
        say(out, "wrote", "green", str(json_out))
    if save_predictions is not None:
        say(out, "wrote", "green", str(save_predictions))


def render_metrics(result: dict, per_class: bool) -> None:
    table = Table(title=f"COCO box metrics · {result['num_images']} images · {result['num_predictions']} predictions", title_justify="left")
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
    for name in names:
        table.add_column(name, justify="right")
    # COCOeval reports -1 where the ground truth has no object of that size: show a dash.
    table.add_row(*("—" if result["metrics"][n] < 0 else f"{100 * result['metrics'][n]:.1f}" for n in names))
    out.print(table)
    if per_class and result.get("per_class"):
        per = Table("class", "AP", title="AP per class", title_justify="left")
        for cls, ap in result["per_class"].items():
            per.add_row(Text(cls), "—" if ap is None else f"{100 * ap:.1f}")  # class names are text, not markup
        out.print(per)
