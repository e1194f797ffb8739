"""kdctl export: a trained detector as safetensors, ONNX or TorchScript, verified and measured."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from kdctl.cli.common import cli_errors, err, out, print_json, say


@cli_errors
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A kdctl checkpoint (.safetensors) or run directory (its last.safetensors)."),
    fmt: str = typer.Option(..., "--format", help="safetensors, onnx or torchscript."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="File to write (default: beside the checkpoint, e.g. RUN/best.onnx)."),
    opset: Optional[int] = typer.Option(None, "--opset", min=1, help="ONNX opset (default 18; 17 is converted down)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Any batch size (onnx: symbolic batch; torchscript: traced at 2); verified at batch 2 too."),
    input_size: Optional[tuple[int, int]] = typer.Option(None, "--input-size", metavar="H W", help="Input height and width in pixels, multiples of 32 (default: the recipe's short and max side)."),
    half: bool = typer.Option(False, "--half", help="float16 weights (and float16 compute in onnx/torchscript); verified at a looser tolerance."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare with PyTorch on real images; a failed check writes nothing and exits 2."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="A teacher checkpoint to report beside the student (params, FLOPs, latency)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image file or folder to verify on (default: ../shared/data photos + the checkpoint's val data)."),
    runs: int = typer.Option(20, "--runs", min=0, help="Timed runs per latency (median after 3 warm-up runs); 0 skips latency."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    end_to_end: bool = typer.Option(False, "--end-to-end", help="onnx: uint8 images in, boxes/scores/labels/num_detections out, NMS in the graph (dynamic batch)."),
    conf: Optional[float] = typer.Option(None, "--conf", help="--end-to-end: score threshold baked into the graph (default: the recipe's eval.score_thr)."),
    iou: Optional[float] = typer.Option(None, "--iou", help="--end-to-end: NMS IoU baked into the graph (default: the recipe's / the head's)."),
    max_det: Optional[int] = typer.Option(None, "--max-det", help="--end-to-end: detections per image (default: the recipe's eval.max_per_image)."),
    int8: bool = typer.Option(False, "--int8", help="onnx: static INT8 quantization (QDQ, per-channel weights; NMS stays float), checked by AP on the val split."),
    calibration: Optional[str] = typer.Option(None, "--calibration", metavar="DATA", help="--int8: images to calibrate on (a COCO .json, YOLO data.yaml, VOC folder, shapes or a recipe)."),
    calibration_images: int = typer.Option(64, "--calibration-images", min=1, help="--int8: how many calibration images (spread over the data)."),
    calibration_method: Optional[str] = typer.Option(None, "--calibration-method", help="--int8: entropy (default, chosen by measurement: BENCHMARKS.md), minmax or percentile."),
    max_ap_drop: float = typer.Option(1.0, "--max-ap-drop", min=0.0, help="--int8: refuse to write the file when AP (0-100) drops by more than this."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Export a trained detector (no teacher, no adapters) as safetensors, ONNX or TorchScript; verify it against PyTorch and report size, FLOPs and latency.

    Examples: [bold]kdctl export runs/shapes/best.safetensors --format onnx --dynamic-batch --teacher runs/shapes-teacher/best.safetensors[/]
              [bold]kdctl export runs/shapes/best.safetensors --format onnx --end-to-end --int8 --calibration shapes[/]
    """
    from kdctl.export import VerificationFailed, export_detector
    from kdctl.export.profile import detections_line, verify_table

    try:
        with err.status(Text(f"exporting {checkpoint} as {fmt}")):  # a path is text, not markup
            result = export_detector(checkpoint, fmt, out=out_path, opset=opset, dynamic_batch=dynamic_batch, input_size=input_size,
                                     half=half, verify=verify, teacher=teacher, images=images, runs=runs, force=force,
                                     end_to_end=end_to_end, conf=conf, iou=iou, max_det=max_det, int8=int8,
                                     calibration=calibration, calibration_images=calibration_images,
                                     calibration_method=calibration_method, max_ap_drop=max_ap_drop)
    except VerificationFailed as exc:
        if not as_json:  # the evidence, then the one error line
            err.print(verify_table(exc.verify))
            err.print(detections_line(exc.verify), soft_wrap=True)
        raise
    if as_json:
        return print_json(result)
    render_export(result)


def render_export(result: dict) -> None:
    from kdctl.export.profile import detections_line, report_table, verify_table

    if result["dropped"]:
        say(err, "note", "cyan", f"dropped {result['dropped']} keys that are not the detector's")
    if result["verify"] is not None:
        out.print(verify_table(result["verify"]))
        out.print(detections_line(result["verify"]), soft_wrap=True)
    else:
        err.print("[yellow]not verified[/] (--no-verify)")
    out.print(report_table(result["report"], tuple(result["input_size"])))
    if result.get("end_to_end"):
        e = result["end_to_end"]
        out.print(f"end-to-end: score > {e['score_thr']:g}, NMS IoU {e['nms_iou']:g}, top {e['topk_pre_nms']} per level, "
                  f"at most {e['max_per_image']} detections per image", soft_wrap=True)
    if result.get("int8"):
        from kdctl.export.quantize import int8_table

        out.print(int8_table(result["int8"]))
    size = result["report"]["student"]["file_bytes"] / 2**20
    say(out, "wrote", "green", f"{result['out']} ({result['format']}, {result['dtype']}, {size:.2f} MiB)")
