"""Forward + backward time of kdctl's SSIM feature-distillation loss against kornia's
``ssim_loss`` on FPN-shaped features, both measured in one run on identical inputs.

Inputs: ``B x C`` student and teacher feature maps per FPN level (default ``B = 2``, ``C = 256``,
levels P3-P7 of a 800 x 1216 image: 100x152, 50x76, 25x38, 13x19, 7x10), ``torch.randn`` with a
fixed seed; the student's require grad, the teacher's do not.

Methods (one timed step = the sum over the levels, then ``backward()`` to the student's maps):

- ``kdctl``: ``kdctl.distill.ssim.ssim_feature_loss(s, t)`` per level: per-sample, per-channel
  min-max normalisation, 11x11 Gaussian window (sigma 1.5), reflect border,
  ``mean((1 - SSIM) / 2)``; one fused autograd function (value and gradient in one chunked pass).
- ``kornia``: ``kornia.losses.ssim_loss(norm(s), norm(t), 11)`` per level, with ``norm`` the
  same min-max normalisation ``(x - min) / (max - min + 1e-6)`` in plain differentiable ops
  (kornia has none of its own), inside the timed step. Same window, border and constants;
  kornia adds ``eps = 1e-12`` to the denominator and clamps the per-pixel loss to [0, 1], which
  only matters at rounding level.
- ``kdctl-autograd`` (optional, ``--methods``): kdctl's private reference path, the same
  maths in plain differentiable ops (``_ssim_feature_loss_reference``), i.e. what the fused
  function saves.

Correctness check printed with the timings: per-level and total losses of kdctl and kornia,
the max abs difference of the total losses and of the gradients w.r.t. the student maps.

Timing: ``--warmup`` steps per method, then ``--repeats`` rounds; in each round every method
runs one step timed with ``time.perf_counter`` (on CUDA synchronised at both ends), the method
order rotating by one each round so machine noise falls on all. Reported: median and min ms per
step, the process CPU time per step (all threads; a cross-check on a shared machine), and the
speedup kornia / kdctl as a ratio of medians and as the median of per-round ratios.

Run: ``.venv/bin/python benchmarks/bench_ssim.py [--device cpu|cuda] [--repeats 10]
[--threads N] [--batch 2] [--channels 256] [--sizes 100x152,50x76,25x38,13x19,7x10]
[--methods kdctl,kornia,kdctl-autograd] [--json OUT]`` (about a minute with the defaults on a
quiet 2-core CPU). On a CPU shared with other work, ``--threads 1`` is the robust setting: with
2 threads on 2 busy cores every OpenMP region waits for a descheduled thread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from kdctl.distill.ssim import _ssim_feature_loss_reference, ssim_feature_loss

METHODS = ("kdctl", "kornia", "kdctl-autograd")
DEFAULT_SIZES = "100x152,50x76,25x38,13x19,7x10"


# ---------------------------------------------------------------------------- inputs and methods
def make_inputs(batch: int, channels: int, sizes: list[tuple[int, int]], device: torch.device):
    """Seeded student (requires grad) and teacher maps, one pair per level."""
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(batch, channels, h, w, generator=g).to(device).requires_grad_() for h, w in sizes]
    teachers = [torch.randn(batch, channels, h, w, generator=g).to(device) for h, w in sizes]
    return students, teachers


def minmax(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample, per-channel min-max normalisation, plain differentiable ops."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return (x - lo) / (hi - lo + eps)


def level_losses(name: str, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:
    if name == "kdctl":
        return [ssim_feature_loss(s, t) for s, t in zip(students, teachers)]
    if name == "kdctl-autograd":
        return [_ssim_feature_loss_reference(s, t) for s, t in zip(students, teachers)]
    import kornia

    return [kornia.losses.ssim_loss(minmax(s), minmax(t), 11) for s, t in zip(students, teachers)]


def make_step(name: str, students: list[torch.Tensor], teachers: list[torch.Tensor]):
    def step() -> torch.Tensor:
        for s in students:
            s.grad = None
        loss = sum(level_losses(name, students, teachers))
        loss.backward()
        return loss.detach()

    return step


# ---------------------------------------------------------------------------- measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call, synchronised at both ends."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return 1000 * (time.perf_counter() - start), 1000 * (time.process_time() - start_cpu)


def check(names: list[str], students, teachers) -> dict:
    """Per-level losses of every method and, against the first, the max abs differences of the
    total loss and of the student gradients."""
    out, ref_grads = {}, None
    for name in names:
        for s in students:
            s.grad = None
        losses = level_losses(name, students, teachers)
        sum(losses).backward()
        grads = [s.grad.detach().clone() for s in students]
        out[name] = {"levels": [v.item() for v in losses], "total": sum(v.item() for v in losses)}
        if ref_grads is None:
            ref_name, ref_grads = name, grads
            ref_max = max(g.abs().max().item() for g in grads)
        else:
            out[name]["vs"] = ref_name
            out[name]["loss_abs_diff"] = abs(out[name]["total"] - out[ref_name]["total"])
            out[name]["grad_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads))
            out[name]["grad_max_abs"] = ref_max
    for s in students:
        s.grad = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="SSIM feature-distillation loss, forward + backward: kdctl vs kornia.")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (one step per method per round)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of HxW, one per FPN level")
    ap.add_argument("--methods", default="kdctl,kornia", help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    names = [n for n in args.methods.split(",") if n]
    if unknown := [n for n in names if n not in METHODS]:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    if "kornia" in names:
        try:
            import kornia  # noqa: F401
        except ImportError:
            print("# kornia is not installed (a test-only dependency): timing kdctl alone")
            names.remove("kornia")

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"# {dev}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# B={args.batch}, C={args.channels}, levels {args.sizes}; {args.warmup} warm-up + {args.repeats} rounds, "
          "one forward+backward step per method per round, order rotated")
    students, teachers = make_inputs(args.batch, args.channels, sizes, device)
    info = check(names, students, teachers)
    steps = {n: make_step(n, students, teachers) for n in names}
    for name in names:
        for _ in range(args.warmup):
            steps[name]()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            w, c = timed(steps[name], device)
            wall[name].append(w)
            cpu[name].append(c)

    print()
    header = f"{'method':<16}{'median ms':>11}{'min ms':>9}{'CPU ms':>9}{'total loss':>13}   per-level loss"
    print(header)
    print("-" * (len(header) + 40))
    for name in names:
        d = info[name]
        d.update(median_ms=statistics.median(wall[name]), min_ms=min(wall[name]), cpu_ms=statistics.median(cpu[name]),
                 rounds_ms=wall[name])
        print(f"{name:<16}{d['median_ms']:>11.1f}{d['min_ms']:>9.1f}{d['cpu_ms']:>9.1f}{d['total']:>13.6f}   "
              + " ".join(f"{v:.5f}" for v in d["levels"]))
    for name in names[1:]:
        d = info[name]
        print(f"{name} vs {d['vs']}: |loss diff| {d['loss_abs_diff']:.2e}, max |grad diff| "
              f"{d['grad_max_abs_diff']:.2e} (max |grad| {d['grad_max_abs']:.2e})")
    ratios = {}
    if "kdctl" in names:
        for peer in names:
            if peer == "kdctl":
                continue
            per_round = statistics.median(b / a for a, b in zip(wall["kdctl"], wall[peer]))
            ratios[peer] = {"speedup": info[peer]["median_ms"] / info["kdctl"]["median_ms"], "per_round_median": per_round}
            print(f"speedup kdctl vs {peer}: {ratios[peer]['speedup']:.2f}x (ratio of medians; median of per-round "
                  f"ratios {per_round:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": dev, "threads": torch.get_num_threads(), "methods": info,
                       "speedup": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
