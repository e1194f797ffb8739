"""TorchScript export of the tensor path (:class:`~kdctl.export.source.TensorPath`).

``torch.jit.trace`` at the export input size: a file that ``torch.jit.load`` runs in Python and
libtorch runs from C++ without kdctl. The traced graph reads shapes from its input, so it also
runs at other batch sizes (``--dynamic-batch`` traces at batch 2 and verifies batch 1 and 2).
Input, outputs and their names are the ONNX graph's (:mod:`kdctl.export.onnx`); decoding and NMS
stay outside. The artifact's metadata is stored as the extra file ``kdctl.json`` inside the
archive (``torch.jit.load(path, _extra_files={"kdctl.json": ""})`` reads it back).

PyTorch 2.14 marks TorchScript as deprecated in favour of ``torch.export``; it still works and is
still what libtorch deployments load, so kdctl writes it and silences the deprecation warnings
here (they address PyTorch's users, not kdctl's).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

EXTRA_FILE = "kdctl.json"


def export_torchscript(module: torch.nn.Module, path: Path, size: tuple[int, int], *, dynamic_batch: bool = False,
                       meta: dict[str, str] | None = None) -> None:
    """Trace ``module`` on zeros ``[1 or 2, 3, H, W]`` and save it to ``path`` with ``meta`` as
    the extra file ``kdctl.json``."""
    example = torch.zeros(2 if dynamic_batch else 1, 3, *size)
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings come from GroupNorm's batch-size sanity check (a Python bool of a
        # shape product) and are harmless here; FutureWarnings are the deprecation notices
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta or {})})


class TorchScriptRunner:
    """A saved TorchScript file as a callable ``[B, 3, H, W]`` -> tuple of tensors; ``meta``
    holds its ``kdctl.json``."""

    def __init__(self, path: Path):
        extra = {EXTRA_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        self.meta = json.loads(extra[EXTRA_FILE] or "{}")

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            return tuple(self.module(images))
