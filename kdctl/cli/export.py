"""kdctl export: a trained detector as safetensors, ONNX or TorchScript, verified and measured."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdctl.cli.common import cli_errors, err, out, print_json


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
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Export a trained detector (no teacher, no adapters) as safetensors, ONNX or TorchScript; verify it against PyTorch and report size, FLOPs and latency.

    Example: [bold]kdctl export runs/shapes/best.safetensors --format onnx --dynamic-batch --teacher runs/shapes-teacher/best.safetensors[/]
    """
    from kdctl.export import VerificationFailed, export_detector
    from kdctl.export.report import detections_line, verify_table

    try:
        with err.status(f"exporting {checkpoint} as {fmt}"):
            result = export_detector(checkpoint, fmt, out=out_path, opset=opset, dynamic_batch=dynamic_batch, input_size=input_size,
                                     half=half, verify=verify, teacher=teacher, images=images, runs=runs, force=force)
    except VerificationFailed as exc:
        if not as_json:  # the evidence, then the one error line
            err.print(verify_table(exc.verify))
            err.print(detections_line(exc.verify), soft_wrap=True)
        raise
    if as_json:
        return print_json(result)
    render_export(result)


def render_export(result: dict) -> None:
    from kdctl.export.report import detections_line, report_table, verify_table

    if result["dropped"]:
        err.print(f"[cyan]note[/] dropped {result['dropped']} keys that are not the detector's", soft_wrap=True)
    if result["verify"] is not None:
        out.print(verify_table(result["verify"]))
        out.print(detections_line(result["verify"]), soft_wrap=True)
    else:
        err.print("[yellow]not verified[/] (--no-verify)")
    out.print(report_table(result["report"], tuple(result["input_size"])))
    size = result["report"]["student"]["file_bytes"] / 2**20
    out.print(f"[green]wrote[/] {result['out']} ({result['format']}, {result['dtype']}, {size:.2f} MiB)", soft_wrap=True)
