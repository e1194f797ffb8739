"""``kdctl export``: a trained detector as one deployable file, checked against PyTorch.

Formats (``FORMATS``):

- ``safetensors``: the detector's own weights (float32, or float16 with ``half``) and metadata
  from which ``kdctl eval`` and :func:`kdctl.load_detector` rebuild it (:mod:`.source`);
- ``onnx``: the tensor path images -> raw head outputs, for onnxruntime (:mod:`.onnx`); with
  ``end_to_end``, uint8 images -> boxes, scores, labels, num_detections with NMS in the graph
  (:mod:`.end_to_end`); with ``int8``, statically quantized (:mod:`.quantize`);
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
import json
import tempfile
from pathlib import Path

import torch

from kdctl.artifact.checkpoint import atomic_path
from kdctl.errors import KdctlError
from kdctl.export.onnx import DEFAULT_OPSET, OrtRunner, export_onnx
from kdctl.export.profile import count_flops, count_params, interleaved_ms
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
from kdctl.export.verify import (
    ATOL,
    E2E_BOX_ATOL,
    HALF_ATOL,
    HALF_RTOL,
    failure,
    letterboxed,
    preprocess,
    run_checks,
    run_checks_end_to_end,
    verification_images,
)

__all__ = ["FORMATS", "DEFAULT_OPSET", "VerificationFailed", "export_detector", "read_detector"]

# format -> default file suffix (beside the checkpoint: RUN/best.safetensors -> RUN/best.onnx)
FORMATS = {"safetensors": ".export.safetensors", "onnx": ".onnx", "torchscript": ".torchscript.pt"}
RUNTIME = {"safetensors": "PyTorch (reloaded file)", "onnx": "onnxruntime", "torchscript": "TorchScript",
           "onnx-end-to-end": "onnxruntime, end-to-end"}


class VerificationFailed(KdctlError):
    """The export disagrees with PyTorch; ``verify`` holds the comparison (nothing was written)."""

    def __init__(self, message: str, verify: dict):
        super().__init__(message)
        self.verify = verify


def default_out(file: Path, fmt: str, half: bool, end_to_end: bool = False, int8: bool = False) -> Path:
    """``RUN/best.safetensors`` -> ``RUN/best.onnx`` (``best-fp16.onnx`` with ``half``,
    ``best-e2e.onnx`` with ``end_to_end``, ``best-int8.onnx`` with ``int8``)."""
    stem = file.name[: -len(".safetensors")] if file.name.endswith(".safetensors") else file.stem
    tags = "".join(t for t, on in (("-e2e", end_to_end), ("-int8", int8), ("-fp16", half)) if on)
    return file.with_name(f"{stem}{tags}{FORMATS[fmt]}")


def _check_args(fmt: str, opset: int | None, dynamic_batch: bool, input_size, runs: int, *, half: bool = False,
                end_to_end: bool = False, int8: bool = False, e2e_settings: dict | None = None) -> None:
    if fmt not in FORMATS:
        raise KdctlError(f"--format: expected {', '.join(FORMATS)}, got {fmt!r}")
    for flag, on in (("--end-to-end", end_to_end), ("--int8", int8)):
        if on and fmt != "onnx":
            raise KdctlError(f"{flag} applies to --format onnx only, not {fmt}; use --format onnx")
        if on and half:
            raise KdctlError(f"{flag} and --half: choose one (--half is a float16 export of the raw graph)")
    if not end_to_end and any(v is not None for v in (e2e_settings or {}).values()):
        raise KdctlError("--conf, --iou and --max-det are baked into an --end-to-end export only; add --end-to-end or leave them out")
    if opset is not None and fmt != "onnx":
        raise KdctlError(f"--opset applies to --format onnx only, not {fmt}; leave it out")
    if dynamic_batch and fmt == "safetensors":
        raise KdctlError("--dynamic-batch applies to onnx and torchscript; a safetensors file holds weights only, leave it out")
    if runs < 0:
        raise KdctlError(f"--runs: must be 0 (no latency) or more, got {runs}")
    check_input_size(input_size)


def e2e_settings(src: Source, conf: float | None, iou: float | None, max_det: int | None) -> dict:
    """The postprocess settings an end-to-end graph bakes in: the recipe's eval defaults
    (:meth:`.source.Source.postprocess_cfg`) with ``--conf`` / ``--iou`` / ``--max-det``."""
    post = src.postprocess_cfg()
    for key, value, name, ok in (("score_thr", conf, "--conf", lambda v: 0 <= v < 1), ("nms_iou", iou, "--iou", lambda v: 0 < v <= 1),
                                 ("max_per_image", max_det, "--max-det", lambda v: v >= 1)):
        if value is not None:
            if not ok(value):
                raise KdctlError(f"{name} {value}: out of range (--conf in [0, 1), --iou in (0, 1], --max-det >= 1)")
            post[key] = type(post[key])(value)
    return post


def e2e_meta(src: Source, size: tuple[int, int], post: dict) -> dict[str, str]:
    """The metadata of an end-to-end graph: :func:`.source.export_meta` with its ``postprocess``
    set to the baked settings, plus ``end_to_end`` (JSON: the settings, the score rule, the input
    and resize rule, the outputs; what a plain onnxruntime script needs)."""
    from kdctl.data.transforms import pad_colour
    from kdctl.export.end_to_end import OUTPUT_NAMES
    from kdctl.export.model_file import E2E_KEY

    meta = export_meta(src, size, False)
    meta["postprocess"] = json.dumps(post)
    meta[E2E_KEY] = json.dumps({
        "score_thr": post["score_thr"], "nms_iou": post["nms_iou"], "topk_pre_nms": post["topk_pre_nms"],
        "max_det": post["max_per_image"], "score_rule": src.model.postprocess_rules["score_rule"], "drop_empty": src.model.postprocess_rules["drop_empty"],
        "input": "images uint8 RGB [B, 3, H, W]",
        "resize": "keep ratio: scale min(H/h, W/w), sides rounded, bilinear with antialias; pad bottom/right",
        "pad_colour": list(pad_colour(src.model.mean)), "outputs": OUTPUT_NAMES,
        "boxes": "xyxy input pixels clipped to the input; clip to the image's resized extent, drop empty boxes, divide by the scale",
    })
    return meta


def _write(fmt: str, src: Source, tmp: Path, size: tuple[int, int], *, half: bool, opset: int, dynamic_batch: bool,
           meta: dict[str, str], post: dict | None = None):
    """Write the artifact to ``tmp``; return a callable that runs it (images -> outputs).
    ``post``: the baked settings of an end-to-end graph (None: the raw graph)."""
    if post is not None:
        from kdctl.export.end_to_end import OUTPUT_NAMES, TRANSLATIONS, EndToEnd

        module = EndToEnd(src.model, size, score_thr=post["score_thr"], nms_iou=post["nms_iou"],
                          topk_pre_nms=post["topk_pre_nms"], max_det=post["max_per_image"])
        export_onnx(module, tmp, size, names=OUTPUT_NAMES, opset=opset, dynamic_batch=True, meta=meta, dtype=torch.uint8,
                    translations=TRANSLATIONS)
        return OrtRunner(tmp)
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
                  images: Path | None = None, post: dict | None = None) -> dict:
    """Compare ``runtime`` with the PyTorch detector on the verification images (see
    :mod:`.verify`); the result says per output and batch size how far apart they are.
    ``post``: an end-to-end graph's baked settings (its detections are compared instead)."""
    pics, note = verification_images(src.recipe, images)
    if post is not None:
        x, _, _ = letterboxed([p for _, p in pics], size, src.model.mean)
        checks = run_checks_end_to_end(src.model, runtime, x, post=post, batch_two=True)
        why = failure(checks, False)
        return {"runtime": RUNTIME["onnx-end-to-end"], "note": note, "images": [label for label, _ in pics],
                "tolerance": f"boxes {E2E_BOX_ATOL:g} px, scores {ATOL:g}", "checks": [dataclasses.asdict(c) for c in checks],
                "passed": why is None, "failure": why}
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


def latencies(models: dict, size: tuple[int, int], runs: int, *, half: bool, fmt: str, runner=None, uint8_runner=None) -> dict:
    """``{who: {runtime: median ms}}`` for ``models`` (``{"student": ..., "teacher": ...}``),
    batch 1, every runtime of every model interleaved; ``runner`` is the student's artifact;
    ``uint8_runner``: the student's end-to-end graph (timed as its ``onnxruntime``, on a uint8
    image, NMS included)."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    u8 = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="kdctl-export-") as tmp:
        fns = {}
        for who, model in models.items():
            folder = Path(tmp) / who
            folder.mkdir()
            own = runner if who == "student" and uint8_runner is None else None
            for name, fn in runtimes(model, size, folder, half=half, fmt=fmt, runner=own).items():
                fns[(who, name)] = fn
            if who == "student" and uint8_runner is not None:
                fns[(who, "onnxruntime")] = lambda _x, run=uint8_runner: run(u8)
        ms = interleaved_ms(fns, x, runs)
    return {who: {name: v for (w, name), v in ms.items() if w == who} for who in models}


def export_detector(checkpoint: str | Path, fmt: str, *, out: str | Path | None = None, opset: int | None = None,
                    dynamic_batch: bool = False, input_size: tuple[int, int] | None = None, half: bool = False,
                    verify: bool = True, teacher: str | Path | None = None, images: Path | None = None, runs: int = 20,
                    force: bool = False, end_to_end: bool = False, conf: float | None = None, iou: float | None = None,
                    max_det: int | None = None, int8: bool = False, calibration: str | None = None,
                    calibration_images: int = 64, calibration_method: str | None = None, max_ap_drop: float = 1.0) -> dict:
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
        end_to_end: the end-to-end graph (:mod:`.end_to_end`; always a dynamic batch) with
            ``conf`` / ``iou`` / ``max_det`` baked in (None: the recipe's eval settings).
        int8: quantize the graph (:mod:`.quantize`) on ``calibration_images`` images of
            ``calibration`` (a DATA argument), refusing when AP drops by more than ``max_ap_drop``.

    Returns a JSON-ready dict: ``out``, ``format``, ``dtype``, ``input_size``, ``dropped_keys``,
    ``verify`` (None when skipped), ``report``, ``end_to_end`` (baked settings or None),
    ``int8`` (the quantization report or None).
    """
    _check_args(fmt, opset, dynamic_batch, input_size, runs, half=half, end_to_end=end_to_end, int8=int8,
                e2e_settings={"conf": conf, "iou": iou, "max_det": max_det})
    if int8 and calibration is None:
        raise KdctlError("--int8 needs --calibration DATA: images to calibrate the activation ranges on (e.g. the training data)")
    if calibration is not None and not int8:
        raise KdctlError("--calibration applies to --int8 only; add --int8 or leave it out")
    if int8:
        from kdctl.export.quantize import METHODS

        if calibration_method is not None and calibration_method not in METHODS:
            raise KdctlError(f"--calibration-method: expected {', '.join(METHODS)}, got {calibration_method!r}")
    src = read_detector(checkpoint)
    out = Path(out) if out is not None else default_out(src.file, fmt, half, end_to_end, int8)
    if out.exists() and out.resolve() == src.file.resolve():
        raise KdctlError(f"{out}: is the checkpoint being exported; choose another --out")
    if out.is_dir():
        raise KdctlError(f"{out}: is a folder; give a file name for --out")
    if out.exists() and not force:
        raise KdctlError(f"{out}: already exists; pass --force to overwrite it or choose another path")
    size = tuple(int(v) for v in input_size) if input_size else default_input_size(src.recipe)
    _probe(src.model, size)
    post = e2e_settings(src, conf, iou, max_det) if end_to_end else None
    meta = e2e_meta(src, size, post) if end_to_end else export_meta(src, size, half)
    if int8:
        meta["dtype"] = "int8"
    opset = opset or DEFAULT_OPSET
    t = read_detector(teacher) if teacher is not None else None  # a bad --teacher fails before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    quant = None
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="kdctl-export-") as work:
        with atomic_path(out) as tmp:
            first = Path(work) / "fp32.onnx" if int8 else tmp
            runner = _write(fmt, src, first, size, half=half, opset=opset, dynamic_batch=dynamic_batch or end_to_end,
                            meta=meta, post=post)
            checked = verify_export(src, runner, fmt, size, half=half, dynamic_batch=dynamic_batch, images=images,
                                    post=post) if verify else None
            if checked is not None and int8:
                checked["runtime"] += " (the float32 graph, before quantization)"
            if checked is not None and not checked["passed"]:
                raise VerificationFailed(f"{out}: verification failed: {checked['failure']}; nothing was written "
                                         "(--no-verify writes the file unchecked)", checked)
            if int8:
                from kdctl.export.quantize import quantize_export

                quant = quantize_export(first, tmp, src, size, calibration=calibration, n_images=calibration_images,
                                        method=calibration_method, max_ap_drop=max_ap_drop, runs=runs, out=out)
                runner = OrtRunner(tmp)
        report = {"runs": runs, "threads": torch.get_num_threads(), "student": _describe(src.model, size, out.stat().st_size)}
        if t is not None:
            report["teacher"] = _describe(t.model, size, t.file.stat().st_size, source=str(t.file))
        if runs:
            models = {"student": src.model, **({"teacher": t.model} if t is not None else {})}
            ms = latencies(models, size, runs, half=half, fmt=fmt, runner=None if fmt == "safetensors" else runner,
                           uint8_runner=runner if end_to_end else None)
            for who, row in ms.items():
                report[who]["latency_ms"] = row
    if end_to_end:
        from kdctl.export.end_to_end import OUTPUT_NAMES
    return {
        "out": str(out), "format": fmt, "dtype": meta["dtype"], "input_size": list(size), "source": str(src.file),
        "source_model": meta["source_model"], "opset": opset if fmt == "onnx" else None,
        "dynamic_batch": dynamic_batch or end_to_end, "outputs": OUTPUT_NAMES if end_to_end else TensorPath(src.model).names,
        "dropped_keys": len(src.dropped), "dropped": dropped_summary(src.dropped) if src.dropped else None,
        "verify": checked, "report": report, "end_to_end": post, "int8": quant,
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
