"""INT8 ONNX: onnxruntime static quantization of an exported graph, checked by AP.

``kdctl export CKPT --format onnx [--end-to-end] --int8 --calibration DATA``:

1. the float32 graph is written and verified as usual (:mod:`kdctl.export.verify`);
2. ``onnxruntime.quantization.quant_pre_process`` (shape inference, graph optimisation: the
   convolutions absorb their BatchNorms first, so the folded weights are what gets quantized);
3. ``quantize_static`` in the QDQ format (QuantizeLinear / DequantizeLinear pairs that
   onnxruntime fuses into integer kernels): weights int8, symmetric, **per output channel**;
   activations uint8, asymmetric, their ranges calibrated on ``--calibration-images`` images of
   ``--calibration`` (evenly spread over the data), letterboxed like every other input;
4. only the detector is quantized: the nodes from which a convolution can be reached (and the
   convolutions). Decoding, score thresholds, top-k and NMS stay float32, so boxes keep their
   sub-pixel precision and the NMS IoUs are computed as in the float graph;
5. AP (COCO, 0-100) of the float32 and the INT8 file on the checkpoint's validation split, each
   through :func:`kdctl.evaluation.inference.evaluate_model_file`, and their onnxruntime CPU latency
   at batch 1 (same threads, interleaved runs, :func:`kdctl.export.profile.interleaved_ms`). When AP
   drops by more than ``--max-ap-drop`` the file is not written and the error gives the numbers.

Calibration method: :data:`DEFAULT_METHOD`, chosen by measurement on the demo student
(BENCHMARKS.md, "Export"): on its validation split the INT8 AP moved by -0.33 with ``minmax``,
+0.02 with ``entropy`` and -0.03 with ``percentile`` (64 calibration images, ranges merged
over chunks of 8 images); ``--calibration-method`` picks another.

Reference: onnxruntime documentation, "Quantize ONNX models" (QDQ format, per-channel,
``quant_pre_process``); Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018 (affine uint8 activations, int8 weights).
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from kdctl.errors import KdctlError

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "entropy"  # measured: BENCHMARKS.md, "Export" (AP drop -0.02 vs minmax 0.33, percentile 0.03)
CHUNK = 8  # calibration images whose activations are held at once (see _Reader)


def detector_nodes(model) -> list[str]:
    """Names of the nodes of an ONNX ``model`` that are convolutions or from which a
    convolution can be reached: the detector, without what follows its last convolutions
    (decoding, top-k, NMS)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    keep: set[str] = set()
    stack = [n for n in model.graph.node if n.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        stack.extend(producer[t] for t in node.input if t in producer)
    return [n.name for n in model.graph.node if n.name in keep]


def calibration_batches(data: str, size: tuple[int, int], n: int, mean, std, *, uint8: bool) -> list[np.ndarray]:
    """``n`` images of ``data`` (a DATA argument; its training split), evenly spread, each
    letterboxed to ``size`` as one ``[1, 3, H, W]`` array: uint8 (end-to-end graph) or
    normalised float32 (raw graph)."""
    from kdctl.data import build_dataset, data_config_from_arg
    from kdctl.export.model_file import normalise
    from kdctl.export.verify import letterboxed

    ds = build_dataset(data_config_from_arg(data), "train")
    if len(ds) == 0:
        raise KdctlError(f"--calibration {data}: no images in its training split; give data with images")
    idx = np.unique(np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int))
    x, _, _ = letterboxed([ds.load_image(ds.records[int(i)]) for i in idx], size, mean)
    if not uint8:
        x = normalise(x, mean, std)
    return [t[None].numpy() for t in x]


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over prepared arrays, in ranges:
    with ``CalibStridedMinMax`` the calibrator reads one range of :data:`CHUNK` images at a time
    and merges its statistics (min/max, or histograms), so it holds the activations of 8 images
    instead of all (64 at 640 px do not fit in 24 GiB). Not one image per range: onnxruntime's
    histogram collector fails on a tensor that is nearly constant over one image ("Too many
    bins for data range")."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self.name, self.batches = name, batches
        self.items = iter([])

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.items = iter(self.batches[start_index:end_index])

    def get_next(self):
        b = next(self.items, None)
        return None if b is None else {self.name: b}


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer logs warnings and prints progress; kdctl reports the outcome."""
    lg = logging.getLogger()
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        lg.setLevel(level)


def quantize_onnx(fp32: Path, out: Path, batches: list[np.ndarray], method: str = DEFAULT_METHOD) -> int:
    """Quantize the graph ``fp32`` into ``out`` (see the module docstring), calibrated on
    ``batches``; ``fp32``'s ``metadata_props`` are carried over. Returns the number of nodes
    selected for quantization."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if method not in METHODS:
        raise KdctlError(f"--calibration-method: expected {', '.join(METHODS)}, got {method!r}")
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    source = onnx.load(str(fp32))
    with tempfile.TemporaryDirectory(prefix="kdctl-int8-") as tmp, _quiet():
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        nodes = detector_nodes(onnx.load(str(pre)))
        name = source.graph.input[0].name
        stride = min(CHUNK, len(batches))
        batches = batches[: len(batches) // stride * stride]  # the strided calibration needs whole ranges
        quantize_static(str(pre), str(out), _Reader(name, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib,
                        nodes_to_quantize=nodes, extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                                                "CalibStridedMinMax": stride})
    model = onnx.load(str(out))
    del model.metadata_props[:]
    for p in source.metadata_props:
        entry = model.metadata_props.add()
        entry.key, entry.value = p.key, p.value
    model.producer_name = "kdctl"
    onnx.save(model, str(out))
    return len(nodes)


def latency_pair(fp32: Path, int8: Path, example: np.ndarray, runs: int, threads: int | None = None) -> dict:
    """Median onnxruntime CPU milliseconds of both graphs at batch 1, interleaved."""
    from kdctl.export.onnx import OrtRunner
    from kdctl.export.profile import interleaved_ms

    x = torch.from_numpy(example)
    fns = {"fp32": OrtRunner(fp32, threads), "int8": OrtRunner(int8, threads)}
    return interleaved_ms(fns, x, runs)


def quantize_export(fp32: Path, tmp: Path, src, size: tuple[int, int], *, calibration: str, n_images: int,
                    method: str | None, max_ap_drop: float, runs: int, out: Path) -> dict:
    """Quantize the verified float32 graph ``fp32`` into ``tmp`` (the atomic temporary of
    ``out``), measure both (AP on the checkpoint's validation split, latency) and raise a
    KdctlError with the numbers when the AP drop exceeds ``max_ap_drop``. Returns the report."""
    import shutil

    from kdctl.evaluation.inference import evaluate_model_file
    from kdctl.export.model_file import E2E_KEY, load_model_file

    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise KdctlError(f"--calibration-method: expected {', '.join(METHODS)}, got {method!r}")
    m = src.model
    with tempfile.TemporaryDirectory(prefix="kdctl-int8-") as work:
        q = Path(work) / "int8.onnx"
        f = Path(work) / "fp32.onnx"
        shutil.copyfile(fp32, f)
        fp = load_model_file(f)
        uint8 = E2E_KEY in fp.meta
        batches = calibration_batches(calibration, size, n_images, m.mean, m.std, uint8=uint8)
        nodes = quantize_onnx(f, q, batches, method)
        ap = {}
        for name, path in (("fp32", f), ("int8", q)):
            try:
                res = evaluate_model_file(load_model_file(path), None, split="val", description=f"AP of the {name} graph")
            except KdctlError as exc:
                raise KdctlError(f"--int8: cannot score the graphs on the checkpoint's validation data ({exc}); "
                                 "run where its recipe's data is") from None
            ap[name] = 100.0 * res["metrics"]["AP"]
        ms = latency_pair(f, q, batches[0], max(runs, 5))
        report = {
            "calibration": {"data": calibration, "images": len(batches), "method": method},
            "quantized_nodes": nodes, "ap": {**ap, "drop": ap["fp32"] - ap["int8"], "max_drop": max_ap_drop, "split": "val"},
            "latency_ms": {**ms, "speedup": ms["fp32"] / ms["int8"], "threads": torch.get_num_threads(), "runs": max(runs, 5)},
        }
        if ap["fp32"] - ap["int8"] > max_ap_drop:
            raise KdctlError(f"{out}: INT8 AP {ap['int8']:.1f} vs float32 {ap['fp32']:.1f} on the validation split, a drop of "
                             f"{ap['fp32'] - ap['int8']:.1f} > --max-ap-drop {max_ap_drop:g}; nothing was written (try "
                             "--calibration-method entropy or percentile, more --calibration-images, or a larger --max-ap-drop)")
        shutil.copyfile(q, tmp)
    return report


def int8_table(rep: dict) -> Table:
    """float32 vs INT8: AP on the validation split and onnxruntime latency."""
    c, ap, ms = rep["calibration"], rep["ap"], rep["latency_ms"]
    table = Table(title=f"INT8 vs float32 · onnxruntime CPU, {ms['threads']} threads", title_justify="left",
                  caption=f"{c['method']} calibration on {c['images']} images of {c['data']}; {rep['quantized_nodes']} nodes "
                          f"quantized; latency: median of {ms['runs']} interleaved runs, batch 1", caption_justify="left")
    for i, name in enumerate(["", "AP (val)", "latency ms"]):
        table.add_column(name, justify="left" if i == 0 else "right")
    table.add_row("float32", f"{ap['fp32']:.1f}", f"{ms['fp32']:.1f}")
    table.add_row("int8", f"{ap['int8']:.1f}", f"{ms['int8']:.1f}")
    table.add_row("int8 - float32", f"{-ap['drop']:+.1f}", f"{ms['speedup']:.2f}x faster")
    return table
