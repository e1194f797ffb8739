"""ONNX export of the tensor path (:class:`~kdctl.export.source.TensorPath`) and running it
with onnxruntime on the CPU.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter that is
PyTorch's default since 2.9. The TorchScript-based one (``dynamo=False``) also works on these
models with torch 2.14, but it is deprecated (it warns that it will be removed) and it records a
trace, specialising any Python-level decision on tensor values silently; ``torch.export``
captures the whole graph or fails loudly. Its cost is export time (seconds instead of a fraction
of one). The dynamo exporter implements opset 18 and later natively; ``--opset 17`` is converted
down by onnx's version converter.

Graph: input ``images`` float32 ``[B, 3, H, W]`` (normalised; B = 1, or symbolic ``batch`` with
``--dynamic-batch``), outputs ``cls_p3 .. cls_p7``, ``reg_p3 .. reg_p7`` (+ ``centerness_p*``),
float32. Decoding and NMS are not in the graph: run
:func:`kdctl.models.postprocess.postprocess` on the outputs (the detector's ``raw_from_tuple``
maps them back), the same function ``kdctl eval`` uses, so detections can be compared exactly.
The artifact's metadata (recipe, classes, normalisation, input size, ...) is written into the
model's ``metadata_props``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor

from kdctl.errors import KdctlError

DEFAULT_OPSET = 18
MAX_BATCH = 1024  # upper bound of the symbolic batch dimension


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress to stdout and logs version-conversion warnings; keep stdout
    clean for ``--json`` and the terminal for kdctl's own report."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)  # a failed conversion is reported by kdctl in one line
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(module: torch.nn.Module, path: Path, size: tuple[int, int], *, names: list[str], opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False, meta: dict[str, str] | None = None, dtype: torch.dtype = torch.float32,
                translations: dict | None = None) -> None:
    """Export ``module`` (images ``[B, 3, H, W]`` of ``dtype`` -> tuple of tensors named
    ``names``) to ``path`` with an ``images`` input of ``size`` (H, W), check it with
    ``onnx.checker`` and store ``meta`` as ``metadata_props``. ``translations``: the exporter's
    ``custom_translation_table`` (custom ops -> onnxscript functions). KdctlError (naming the
    opset) when export fails."""
    import onnx

    # torch.export specialises a batch of 1 to a constant; trace the dynamic graph at 2
    example = torch.zeros(2 if dynamic_batch else 1, 3, *size, dtype=dtype)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(module.eval(), (example,), str(path), input_names=["images"], output_names=list(names),
                              opset_version=opset, dynamo=True, dynamic_shapes=dynamic, verbose=False, external_data=False,
                              custom_translation_table=translations)
        model = onnx.load(str(path))
        version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if version != opset:
            raise RuntimeError(f"the graph came out at opset {version}: the exporter could not convert it")
        onnx.checker.check_model(model)
    except KdctlError:
        raise
    except Exception as exc:  # torch.export / onnxscript raise many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KdctlError(f"--opset {opset}: ONNX export failed ({type(exc).__name__}: {reason}); try --opset {DEFAULT_OPSET}") from None
    for key, value in (meta or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "kdctl"
    onnx.save(model, str(path))


class OrtRunner:
    """An onnxruntime CPU session as a callable: ``[B, 3, H, W]`` float32 -> tuple of CPU
    tensors in the graph's output order. ``threads``: intra-op threads (default: torch's)."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        # idle worker threads sleep instead of spinning, so that they do not slow down the
        # PyTorch call timed right after (the report interleaves runtimes)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise KdctlError(f"{path}: onnxruntime cannot load the exported graph ({reason})") from None
        self.input = self.session.get_inputs()[0].name
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        outs = self.session.run(None, {self.input: images.detach().cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
