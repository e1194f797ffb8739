"""The export report: size, parameters, FLOPs and CPU latency of a detector, and its tables.

- ``params``: parameters of the detector (``model.parameters()``; BatchNorm running statistics
  are buffers and not counted).
- ``flops``: FLOPs of one forward pass (backbone, FPN, head; no postprocess) on one image of the
  export input size, as ``torch.utils.flop_counter.FlopCounterMode`` counts them: 2 per
  multiply-accumulate of convolutions and matrix products; normalisation, activations,
  additions and resizing are not counted.
- latency: median wall time in milliseconds of ``runs`` forward passes at batch 1 after 3
  warm-up passes, on the CPU with the same number of threads for PyTorch and onnxruntime
  (``torch.get_num_threads()``; set ``OMP_NUM_THREADS`` to choose), every runtime of the
  student and the teacher interleaved (:func:`interleaved_ms`). ``eager``: the fp32 PyTorch detector under ``no_grad``;
  ``onnxruntime``: the exported ONNX graph (or, for the other formats, a temporary ONNX export of
  the same tensor path); ``torchscript``: the exported TorchScript file.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from rich.table import Table
from torch import nn

WARMUP = 3  # TorchScript's profiling executor optimises the graph during its first calls


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size: tuple[int, int]) -> int:
    """FLOPs of ``model`` on one zero image ``[1, 3, H, W]`` (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, *size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def interleaved_ms(fns: dict, x: torch.Tensor, runs: int) -> dict:
    """Median milliseconds of each ``fns[key](x)`` over ``runs`` calls, after :data:`WARMUP`
    calls of each. The calls are interleaved (one of each per round), so that every runtime
    sees the same machine load: on a shared CPU, timing them one after the other compares
    load as much as runtimes."""
    times: dict = {key: [] for key in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(WARMUP):
                fn(x)
        for _ in range(runs):
            for key, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - start)
    return {key: 1000.0 * statistics.median(t) for key, t in times.items()}


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f} MiB"


def _ms(row: dict, name: str) -> str:
    v = row.get("latency_ms", {}).get(name)
    return "—" if v is None else f"{v:.1f}"


def report_table(report: dict, size: tuple[int, int]) -> Table:
    """Student (and teacher) side by side: file size, parameters, GFLOPs, latencies."""
    rows = [("student", report["student"])] + ([("teacher", report["teacher"])] if "teacher" in report else [])
    runtimes = [n for n in ("eager", "onnxruntime", "torchscript") if any(n in r.get("latency_ms", {}) for _, r in rows)]
    timing = f" · CPU, {report['threads']} threads, median of {report['runs']} runs" if runtimes else ""
    title = f"model · {size[0]}x{size[1]} input{timing}"
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(["", "file", "params", "GFLOPs", *(f"{n} ms" for n in runtimes)]):
        table.add_column(name, justify="left" if i == 0 else "right")
    for who, r in rows:
        table.add_row(who, _mb(r.get("file_bytes")), f"{r['params'] / 1e6:.2f}M", f"{r['flops'] / 1e9:.2f}",
                      *(_ms(r, n) for n in runtimes))
    if "teacher" in report:
        s, t = report["student"], report["teacher"]
        ratios = [f"{t['params'] / s['params']:.1f}x", f"{t['flops'] / max(s['flops'], 1):.1f}x"]
        speed = [f"{t['latency_ms'][n] / s['latency_ms'][n]:.1f}x" if n in t.get("latency_ms", {}) and n in s.get("latency_ms", {}) else "—"
                 for n in runtimes]
        table.add_row("teacher / student", "", *ratios, *speed)
    return table


def verify_table(verify: dict) -> Table:
    """Per output: max |export - pytorch| and its tolerance, for each verified batch size."""
    checks = verify["checks"]
    table = Table(title=f"verification · {verify['runtime']} vs PyTorch", title_justify="left")
    table.add_column("output")
    for c in checks:
        table.add_column(f"max |Δ| (batch {c['batch']})", justify="right")
    table.add_column("tolerance", justify="right")
    for name in checks[0]["diffs"]:
        tol = max(c["tols"][name] for c in checks)
        cells = [f"{'[red]' if c['diffs'][name] > c['tols'][name] else ''}{c['diffs'][name]:.2e}" for c in checks]
        table.add_row(name, *cells, f"{tol:.1e}")
    return table


def detections_line(verify: dict) -> str:
    """Where the images came from, then one line: per batch size, identical or not (fp32) or
    the matched count (fp16)."""
    parts = []
    for c in verify["checks"]:
        d = c["detections"]
        if "identical" in d:
            what = "identical" if d["identical"] else "[red]DIFFERENT[/]"
            extra = f", max |Δbox| {d['max_box_diff']:.1e} px, max |Δscore| {d['max_score_diff']:.1e}" if "max_box_diff" in d else ""
            parts.append(f"batch {c['batch']}: {what} ({d['reference']} vs {d['export']}{extra})")
        else:
            parts.append(f"batch {c['batch']}: {d['matched']} of {d['reference']} matched (IoU ≥ 0.9, same class; {d['export']} in the export)")
    return f"images: {verify['note']}\ndetections after postprocess · " + " · ".join(parts)
