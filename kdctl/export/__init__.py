"""``kdctl export``: a trained detector as one deployable file, checked against PyTorch.

Formats (``FORMATS``):

- ``safetensors``: the detector's own weights (float32, or float16 with ``half``) and metadata
  from which ``kdctl eval`` and :func:`kdctl.load_detector` rebuild it (:mod:`.source`);
- ``onnx``: the tensor path images -> raw head outputs, for onnxruntime (:mod:`.onnx`);
- ``torchscript``: the same tensor path traced for ``torch.jit.load`` / libtorch
  (:mod:`.torchscript`).

Teacher, adapters and distillation parts never reach the artifact (:func:`.source.read_detector`
keeps only the detector's keys and says how many others it dropped). The artifact is written to
a temporary file beside ``out``, verified (:mod:`.verify`), and renamed onto ``out`` only when
the check passes; an existing ``out`` is replaced only with ``force``. Then the report
(:mod:`.report`): file size, parameters, FLOPs, CPU latency, and the teacher's beside them.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from kdctl.engine.checkpoint import atomic_path
from kdctl.errors import KdctlError
from kdctl.export.onnx import DEFAULT_OPSET, OrtRunner, export_onnx
from kdctl.export.report import count_flops, count_params, interleaved_ms
from kdctl.export.source import (
    Source,
    TensorPath,
    check_input_size,
    default_input_size,
    dropped_summary,
    export_meta,
    read_detector,
    save_safetensors,
)
from kdctl.export.torchscript import TorchScriptRunner, export_torchscript
from kdctl.export.verify import ATOL, HALF_ATOL, HALF_RTOL, failure, preprocess, run_checks, verification_images

__all__ = ["FORMATS", "DEFAULT_OPSET", "VerificationFailed", "export_detector", "read_detector"]

# format -> default file suffix (beside the checkpoint: RUN/best.safetensors -> RUN/best.onnx)
FORMATS = {"safetensors": ".export.safetensors", "onnx": ".onnx", "torchscript": ".torchscript.pt"}
RUNTIME = {"safetensors": "PyTorch (reloaded file)", "onnx": "onnxruntime", "torchscript": "TorchScript"}


class VerificationFailed(KdctlError):
    """The export disagrees with PyTorch; ``verify`` holds the comparison (nothing was written)."""

    def __init__(self, message: str, verify: dict):
        super().__init__(message)
        self.verify = verify


def default_out(file: Path, fmt: str, half: bool) -> Path:
    """``RUN/best.safetensors`` -> ``RUN/best.onnx`` (``best-fp16.onnx`` with ``half``)."""
    stem = file.name[: -len(".safetensors")] if file.name.endswith(".safetensors") else file.stem
    return file.with_name(f"{stem}{'-fp16' if half else ''}{FORMATS[fmt]}")


def _check_args(fmt: str, opset: int | None, dynamic_batch: bool, input_size, runs: int) -> None:
    if fmt not in FORMATS:
        raise KdctlError(f"--format: expected {', '.join(FORMATS)}, got {fmt!r}")
    if opset is not None and fmt != "onnx":
        raise KdctlError(f"--opset applies to --format onnx only, not {fmt}; leave it out")
    if dynamic_batch and fmt == "safetensors":
        raise KdctlError("--dynamic-batch applies to onnx and torchscript; a safetensors file holds weights only, leave it out")
    if runs < 0:
        raise KdctlError(f"--runs: must be 0 (no latency) or more, got {runs}")
    check_input_size(input_size)


def _write(fmt: str, src: Source, tmp: Path, size: tuple[int, int], *, half: bool, opset: int, dynamic_batch: bool,
           meta: dict[str, str]):
    """Write the artifact to ``tmp``; return a callable that runs it (images -> outputs)."""
    if fmt == "safetensors":
        save_safetensors(src.model, tmp, meta, half)
        return TensorPath(read_detector(tmp).model)  # what kdctl.load_detector gives back
    module = TensorPath(src.model, half)
    if fmt == "onnx":
        export_onnx(module, tmp, size, names=module.names, opset=opset, dynamic_batch=dynamic_batch, meta=meta)
        return OrtRunner(tmp)
    export_torchscript(module, tmp, size, dynamic_batch=dynamic_batch, meta=meta)
    return TorchScriptRunner(tmp)


def verify_export(src: Source, runtime, fmt: str, size: tuple[int, int], *, half: bool, dynamic_batch: bool,
                  images: Path | None = None) -> dict:
    """Compare ``runtime`` with the PyTorch detector on the verification images (see
    :mod:`.verify`); the result says per output and batch size how far apart they are."""
    pics, note = verification_images(src.recipe, images)
    x, valid, scales = preprocess([p for _, p in pics], size, src.model.mean, src.model.std)
    checks = run_checks(src.model, runtime, TensorPath(src.model), x, valid, scales, names=TensorPath(src.model).names,
                        post=src.postprocess_cfg(), half=half, batch_two=dynamic_batch or fmt == "safetensors")
    why = failure(checks, half)
    return {
        "runtime": RUNTIME[fmt], "note": note, "images": [label for label, _ in pics],
        "tolerance": f"{HALF_ATOL:g} + {HALF_RTOL:g} * max|pytorch output| (float16)" if half else f"{ATOL:g}",
        "checks": [dataclasses.asdict(c) for c in checks], "passed": why is None, "failure": why,
    }


def runtimes(model, size: tuple[int, int], tmp: Path, *, half: bool, fmt: str, runner=None) -> dict:
    """The callables whose latency the report gives (see :mod:`.report`): ``eager`` (fp32
    PyTorch), ``onnxruntime`` (``runner`` when ``fmt`` is onnx, else a temporary ONNX export
    in ``tmp``), and ``torchscript`` when ``fmt`` is torchscript (``runner``, or a temporary
    trace in ``tmp`` when None)."""
    out = {"eager": TensorPath(model)}
    module = TensorPath(model, half)
    if fmt == "onnx" and runner is not None:
        out["onnxruntime"] = runner
    else:
        export_onnx(module, tmp / "m.onnx", size, names=module.names)
        out["onnxruntime"] = OrtRunner(tmp / "m.onnx")
    if fmt == "torchscript":
        if runner is None:
            export_torchscript(module, tmp / "m.pt", size)
            runner = TorchScriptRunner(tmp / "m.pt")
        out["torchscript"] = runner
    return out


def latencies(models: dict, size: tuple[int, int], runs: int, *, half: bool, fmt: str, runner=None) -> dict:
    """``{who: {runtime: median ms}}`` for ``models`` (``{"student": ..., "teacher": ...}``),
    batch 1, every runtime of every model interleaved; ``runner`` is the student's artifact."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="kdctl-export-") as tmp:
        fns = {}
        for who, model in models.items():
            folder = Path(tmp) / who
            folder.mkdir()
            for name, fn in runtimes(model, size, folder, half=half, fmt=fmt, runner=runner if who == "student" else None).items():
                fns[(who, name)] = fn
        ms = interleaved_ms(fns, x, runs)
    return {who: {name: v for (w, name), v in ms.items() if w == who} for who in models}


def export_detector(checkpoint: str | Path, fmt: str, *, out: str | Path | None = None, opset: int | None = None,
                    dynamic_batch: bool = False, input_size: tuple[int, int] | None = None, half: bool = False,
                    verify: bool = True, teacher: str | Path | None = None, images: Path | None = None, runs: int = 20,
                    force: bool = False) -> dict:
    """Export the detector of ``checkpoint`` (a kdctl ``.safetensors`` or a run directory) as
    ``fmt`` to ``out`` (default: beside the checkpoint, :func:`default_out`), verify it and
    report on it; see the module docstring.

    Args:
        opset: ONNX opset (default :data:`DEFAULT_OPSET`); onnx only.
        dynamic_batch: symbolic batch dimension (onnx) / trace at batch 2 (torchscript);
            verification then also runs a batch of 2.
        input_size: (H, W) pixels, multiples of 32 (default :func:`.source.default_input_size`).
        half: float16 weights (and float16 compute in the onnx / torchscript graph).
        verify: compare with PyTorch; a failure raises :class:`VerificationFailed` and leaves
            ``out`` as it was.
        teacher: a kdctl checkpoint whose params / FLOPs / latency go beside the student's.
        images: verification images (file or folder) instead of the defaults.
        runs: timed runs per latency (0: no latency).
        force: replace an existing ``out``.

    Returns a JSON-ready dict: ``out``, ``format``, ``dtype``, ``input_size``, ``dropped_keys``,
    ``verify`` (None when skipped), ``report``.
    """
    _check_args(fmt, opset, dynamic_batch, input_size, runs)
    src = read_detector(checkpoint)
    out = Path(out) if out is not None else default_out(src.file, fmt, half)
    if out.exists() and out.resolve() == src.file.resolve():
        raise KdctlError(f"{out}: is the checkpoint being exported; choose another --out")
    if out.is_dir():
        raise KdctlError(f"{out}: is a folder; give a file name for --out")
    if out.exists() and not force:
        raise KdctlError(f"{out}: already exists; pass --force to overwrite it or choose another path")
    size = tuple(int(v) for v in input_size) if input_size else default_input_size(src.recipe)
    _probe(src.model, size)
    meta = export_meta(src, size, half)
    opset = opset or DEFAULT_OPSET
    t = read_detector(teacher) if teacher is not None else None  # a bad --teacher fails before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        with atomic_path(out) as tmp:
            runner = _write(fmt, src, tmp, size, half=half, opset=opset, dynamic_batch=dynamic_batch, meta=meta)
            checked = verify_export(src, runner, fmt, size, half=half, dynamic_batch=dynamic_batch, images=images) if verify else None
            if checked is not None and not checked["passed"]:
                raise VerificationFailed(f"{out}: verification failed: {checked['failure']}; nothing was written "
                                         "(--no-verify writes the file unchecked)", checked)
        report = {"runs": runs, "threads": torch.get_num_threads(), "student": _describe(src.model, size, out.stat().st_size)}
        if t is not None:
            report["teacher"] = _describe(t.model, size, t.file.stat().st_size, source=str(t.file))
        if runs:
            models = {"student": src.model, **({"teacher": t.model} if t is not None else {})}
            ms = latencies(models, size, runs, half=half, fmt=fmt, runner=None if fmt == "safetensors" else runner)
            for who, row in ms.items():
                report[who]["latency_ms"] = row
    return {
        "out": str(out), "format": fmt, "dtype": meta["dtype"], "input_size": list(size), "source": str(src.file),
        "source_model": meta["source_model"], "opset": opset if fmt == "onnx" else None, "dynamic_batch": dynamic_batch,
        "outputs": TensorPath(src.model).names, "dropped_keys": len(src.dropped),
        "dropped": dropped_summary(src.dropped) if src.dropped else None, "verify": checked, "report": report,
    }


def _probe(model, size: tuple[int, int]) -> None:
    """One eager forward of a zero image at ``size``: a size the detector cannot run (GroupNorm
    needs more than one value per group: a 1x1 P7 map at batch 1) is a KdctlError up front."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
    except (ValueError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KdctlError(f"--input-size {size[0]} {size[1]}: the detector cannot run one image of this size ({reason}); "
                         "use a larger --input-size") from None


def _describe(model, size: tuple[int, int], file_bytes: int, source: str | None = None) -> dict:
    row = {"params": count_params(model), "flops": count_flops(model, size), "file_bytes": file_bytes, "latency_ms": {}}
    if source:
        row["source"] = source
    return row
