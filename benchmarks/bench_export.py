"""End-to-end ONNX and INT8 on the CPU: latency and AP of exported files (BENCHMARKS.md, "Export").

1. End-to-end ONNX (NMS in the graph) vs the raw ONNX + kdctl's Python postprocess, each as
   ``kdctl predict`` runs it (:meth:`kdctl.export.model_file.ModelFile.detect` on one letterboxed
   uint8 image, batch 1), at ``--size`` (640x640), with 1 and 2 onnxruntime threads, interleaved.
   The raw path's time is split into onnxruntime and postprocess.
2. INT8 vs float32: for each calibration method, the raw graph quantized on
   ``--calibration-images`` images of ``--calibration``'s training split; AP on the recipe's
   validation split at the recipe's own input size (what ``kdctl export --int8`` reports). Then,
   for the default method, latency at ``--size`` interleaved with the float32 graph (1 and 2
   threads; the quantized graph does not depend on the method) and where the time goes
   (onnxruntime's per-operator profile of both graphs, summed by operator type).

    python benchmarks/bench_export.py --checkpoint /tmp/e2e-demo/student/best.safetensors
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


def export(ckpt: str, out: Path, size, **kw) -> Path:
    from kdctl.export import export_detector

    export_detector(ckpt, "onnx", out=out, input_size=size, runs=0, force=True, **kw)
    return out


def image_batch(src, size):
    """The first validation image of the checkpoint's recipe, letterboxed to ``size``
    (uint8 [1, 3, H, W], valid sizes, scales)."""
    from kdctl.data import build_dataset
    from kdctl.export.verify import letterboxed

    ds = build_dataset(src.recipe.data, "val")
    return letterboxed([ds.load_image(ds.records[0])], size, src.model.mean)


def interleave(fns: dict, runs: int) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def end_to_end_latency(ckpt: str, tmp: Path, size, runs: int) -> list[dict]:
    from kdctl.export.model_file import load_model_file
    from kdctl.export.source import read_detector
    from kdctl.models.postprocess import postprocess

    src = read_detector(ckpt)
    raw = export(ckpt, tmp / "raw.onnx", size, dynamic_batch=True)
    e2e = export(ckpt, tmp / "e2e.onnx", size, end_to_end=True)
    x, valid, scales = image_batch(src, size)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        r, e = load_model_file(raw, threads=threads), load_model_file(e2e, threads=threads)
        same = r.detect(x, valid, scales)
        other = e.detect(x, valid, scales)
        assert torch.equal(same.labels, other.labels), "end-to-end and raw disagree"
        det, post = r._detector, r.postprocess
        outs = r._run(x)
        H, W = size

        def post_only():
            postprocess(det.decoder, det.flat_outputs(outs), det.priors(outs), torch.tensor([[H, W]]), torch.ones(1, 2),
                        score_thr=post["score_thr"], nms_iou=post["nms_iou"], topk_pre_nms=post["topk_pre_nms"],
                        max_per_image=post["max_per_image"])

        ms = interleave({"end-to-end": lambda: e.detect(x, valid, scales), "raw + postprocess": lambda: r.detect(x, valid, scales),
                         "raw: onnxruntime only": lambda: r._run(x), "raw: postprocess only": post_only}, runs)
        split = graph_split(e2e, x.numpy(), threads)
        rows.append({"threads": threads, **ms, "detections": int(same.labels.numel()),
                     **{f"e2e profile: {k}": v for k, v in split.items()}})
    return rows


def profile_events(path: Path, x, threads: int, runs: int) -> list[dict]:
    """onnxruntime's profiler events of ``runs`` runs of ``path`` on ``x`` with ``threads``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, {"images": x})
    return json.loads(Path(sess.end_profiling()).read_text())


def op_profile(path: Path, x, threads: int, runs: int = 10) -> dict:
    """Milliseconds per run by operator type (onnxruntime's profiler)."""
    events = profile_events(path, x, threads, runs)
    by_op: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            by_op[ev["args"]["op_name"]] += ev["dur"] / 1000 / runs
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def graph_split(path: Path, x, threads: int, runs: int = 10) -> dict:
    """Milliseconds per run of an end-to-end graph's detector nodes (convolutions and all that
    leads to them, :func:`kdctl.export.quantize.detector_nodes`) and of the rest (decoding,
    top-k, NMS, selection), from onnxruntime's profiler; the graph as onnxruntime optimised it."""
    import onnx
    import onnxruntime as ort

    from kdctl.export.quantize import detector_nodes

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    opts.log_severity_level = 3  # not the warning that the optimised file is machine-specific
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])  # writes the optimised graph
    detector = set(detector_nodes(onnx.load(opts.optimized_model_filepath)))
    events = profile_events(path, x, threads, runs)
    out = {"detector": 0.0, "postprocess in the graph": 0.0}
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            node = ev["name"][: -len("_kernel_time")]
            out["detector" if node in detector else "postprocess in the graph"] += ev["dur"] / 1000 / runs
    return out


def int8(ckpt: str, tmp: Path, size, runs: int, methods: list[str], n_images: int, data: str) -> None:
    """AP of every calibration method at the recipe's input size; latency and the operator
    profile at ``size`` for the default method (the graph does not depend on the method)."""
    from kdctl.evaluation.inference import evaluate_model_file
    from kdctl.export.quantize import DEFAULT_METHOD, calibration_batches, latency_pair, quantize_onnx
    from kdctl.export.model_file import load_model_file
    from kdctl.export.source import default_input_size, read_detector

    src = read_detector(ckpt)
    own = default_input_size(src.recipe)
    m = src.model
    fp = export(ckpt, tmp / "fp32-own.onnx", own)
    base = 100 * evaluate_model_file(load_model_file(fp, threads=1), None, description=None)["metrics"]["AP"]
    print(f"float32 AP {base:.2f} ({own[0]}x{own[1]}, val split)", flush=True)
    batches = calibration_batches(data, own, n_images, m.mean, m.std, uint8=False)
    for method in methods:
        q = tmp / f"int8-own-{method}.onnx"
        t = time.perf_counter()
        quantize_onnx(fp, q, batches, method)
        seconds = time.perf_counter() - t
        ap = 100 * evaluate_model_file(load_model_file(q, threads=1), None, description=None)["metrics"]["AP"]
        print(json.dumps({"method": method, "images": len(batches), "ap_fp32": round(base, 2), "ap_int8": round(ap, 2),
                          "drop": round(base - ap, 2), "quantize_s": round(seconds, 1)}), flush=True)
    fp = export(ckpt, tmp / "fp32-bench.onnx", size)
    q = tmp / "int8-bench.onnx"
    quantize_onnx(fp, q, calibration_batches(data, size, min(n_images, 16), m.mean, m.std, uint8=False), DEFAULT_METHOD)
    x = calibration_batches(data, size, 1, m.mean, m.std, uint8=False)[0]
    for threads in (1, 2):
        ms = latency_pair(fp, q, x, runs, threads)
        print(json.dumps({"method": DEFAULT_METHOD, "input": list(size), "threads": threads, "fp32_ms": round(ms["fp32"], 1),
                          "int8_ms": round(ms["int8"], 1), "speedup": round(ms["fp32"] / ms["int8"], 2)}), flush=True)
    for name, path in (("fp32", fp), ("int8", q)):
        ops = op_profile(path, x, 1)
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(ops.items())[:8])
        print(f"where the time goes ({name}, 1 thread, ms per run by operator): {top}; total {sum(ops.values()):.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a trained kdctl checkpoint (the demo student)")
    ap.add_argument("--size", type=int, nargs=2, default=(640, 640))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--methods", default="minmax,entropy,percentile")
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--calibration", default="demo", help="DATA to calibrate on (its training split)")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    size = tuple(args.size)
    with tempfile.TemporaryDirectory(prefix="kdctl-bench-export-") as tmp:
        tmp = Path(tmp)
        if not args.skip_e2e:
            print(f"## end-to-end vs raw + postprocess, {size[0]}x{size[1]}, batch 1, median ms of {args.runs} interleaved runs",
                  flush=True)
            for row in end_to_end_latency(args.checkpoint, tmp, size, args.runs):
                ratio = row["raw + postprocess"] / row["end-to-end"]
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
                      f"raw+post / e2e = {ratio:.2f}x", flush=True)
        torch.set_num_threads(1)
        print(f"## INT8 vs float32 (raw graph): AP at the recipe's size, latency at {size[0]}x{size[1]}", flush=True)
        int8(args.checkpoint, tmp, size, args.runs, args.methods.split(","), args.calibration_images, args.calibration)


if __name__ == "__main__":
    main()
