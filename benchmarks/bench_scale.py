"""Scale-out benchmarks.

``cpu`` — training throughput of the real CLI, one process vs ``--nproc 2`` (gloo), for the
recipe's student alone and with CrossKD: ``kdctl train`` / ``kdctl distill --max-steps N`` on
the recipe's data, img/s read from the run's metrics.jsonl (median of the log intervals after
the first, which holds start-up). The 1-process run gets all ``--cores`` threads, each of the 2
processes half of them, so both use the same cores. Reported: img/s, the 2-process speed-up,
and CrossKD's throughput ratio (plain img/s / CrossKD img/s = CrossKD step time / plain step
time at the same batch).

``gpu`` — one training step of a GFL student (default ResNet-50) alone and with CrossKD from a
GFL teacher (default ResNet-101) on a fixed synthetic batch at 1333x800 (random weights; the
step's cost does not depend on them): fp32 vs bf16 autocast, channels_last and torch.compile on
and off; img/s over ``--steps`` timed steps after ``--warmup`` (CUDA-synchronised), peak memory.

Examples::

    python benchmarks/bench_scale.py cpu --recipe demo --steps 40
    python benchmarks/bench_scale.py gpu --batch 2 --steps 20
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# ============================================================================= cpu
def _img_s(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    speeds = [r["img_s"] for r in rows if r["kind"] == "train"][1:]
    if not speeds:
        raise SystemExit(f"{run_dir}: no timed log interval; raise --steps")
    return statistics.median(speeds)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")


def cpu(args) -> None:
    kdctl = [sys.executable, "-m", "kdctl"]
    work = Path(tempfile.mkdtemp(prefix="kdctl-bench-scale-"))
    teacher = work / "teacher"
    # a teacher checkpoint (its weights do not change the step's cost)
    _run([*kdctl, "train", args.recipe, "--model", "teacher", "--max-steps", "1", "--out", str(teacher),
          "--set", f"runtime.threads={args.cores}"])
    common = ["--max-steps", str(args.steps), "--set", f"train.log_every={args.log_every}",
              "--set", f"data.num_workers={args.workers}"]
    rows = []
    for method in ("none", "crosskd"):
        for nproc in (1, 2):
            out = work / f"{method}-p{nproc}"
            threads = max(1, args.cores // nproc)
            cmd = [*kdctl, "distill", args.recipe, "--method", method, "--out", str(out), *common,
                   "--set", f"runtime.threads={threads}", "--set", "train.eval_every=1000",
                   *(["--teacher", str(teacher / "last.safetensors")] if method != "none" else []),
                   *(["--nproc", "2"] if nproc == 2 else [])]
            t0 = time.perf_counter()
            _run(cmd)
            rows.append({"method": method, "nproc": nproc, "threads": threads, "img_s": _img_s(out),
                         "wall_s": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["method"], r["nproc"]): r["img_s"] for r in rows}
    print("\n| run | 1 process | 2 processes | speed-up |")
    print("|---|---|---|---|")
    for m in ("none", "crosskd"):
        print(f"| {m} | {by[(m, 1)]:.1f} img/s | {by[(m, 2)]:.1f} img/s | {by[(m, 2)] / by[(m, 1)]:.2f}x |")
    print(f"\nCrossKD step / plain step: {by[('none', 1)] / by[('crosskd', 1)]:.2f}x (1 process), "
          f"{by[('none', 2)] / by[('crosskd', 2)]:.2f}x (2 processes)")


# ============================================================================= gpu
def gpu(args) -> None:
    import torch

    from kdctl.data.collate import collate

    dev = torch.device(args.device)
    h, w = args.size
    g = torch.Generator().manual_seed(0)
    b, n = args.batch, 8
    xy = torch.rand(b, n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 32 + torch.rand(b, n, 2, generator=g) * 256
    samples = []
    for i in range(b):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 32 + torch.rand(n, 2, generator=g) * 256
        samples.append({"image": torch.randn(3, h, w, generator=g), "boxes": torch.cat([xy, xy + wh], -1),
                        "labels": torch.randint(0, 80, (n,), generator=g), "ignore": torch.zeros(0, 4),
                        "ignore_labels": torch.zeros(0, dtype=torch.long), "orig_size": (h, w), "image_id": i})
    batch = collate(samples).to(dev)
    rows = []
    compile_options = (False, True) if args.compile else (False,)
    for method, amp, channels_last, compiled in itertools.product(("none", "crosskd"), ("off", "bf16"), (False, True),
                                                                  compile_options):
        dt, mem = _time_step(args, batch, dev, method, amp, channels_last, compiled)
        rows.append({"method": method, "amp": amp, "channels_last": channels_last, "compile": compiled,
                     "img_s": args.batch / dt, "step_ms": 1000 * dt, "peak_gib": mem})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| method | amp | channels_last | compile | img/s | step ms | peak GiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['amp']} | {r['channels_last']} | {r['compile']} | {r['img_s']:.1f} | "
              f"{r['step_ms']:.0f} | {r['peak_gib']:.1f} |")


def _time_step(args, batch, dev, method: str, amp: str, channels_last: bool, compiled: bool) -> tuple[float, float]:
    """Seconds per training step of one configuration and its peak CUDA memory in GiB."""
    import torch

    from kdctl.distill.methods import build_distiller
    from kdctl.engine.device import autocast
    from kdctl.models.detector import build_detector
    from kdctl.recipe import CrossKDLoss, detector_config

    torch.manual_seed(0)
    student = build_detector(detector_config(head="gfl", backbone=args.student, norm_eval=True), 80)
    teacher = build_detector(detector_config(head="gfl", backbone=args.teacher), 80) if method == "crosskd" else None
    losses = [CrossKDLoss(type="crosskd")] if teacher is not None else []
    d = build_distiller(student, teacher, losses, teacher_amp=torch.bfloat16 if amp == "bf16" else None).to(dev).train()
    mf = torch.channels_last if channels_last else torch.contiguous_format
    d.to(memory_format=mf)
    step_batch = copy.copy(batch)
    step_batch.images = batch.images.contiguous(memory_format=mf)
    if compiled:
        for m in (student.backbone, student.neck, *((teacher.backbone, teacher.neck) if teacher else ())):
            m.compile()
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step():
        with autocast(amp, dev):
            total = sum(d(step_batch).values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    del d, student, teacher, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return dt, mem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--recipe", default="demo")
    c.add_argument("--steps", type=int, default=40)
    c.add_argument("--log-every", type=int, default=5)
    c.add_argument("--cores", type=int, default=2)
    c.add_argument("--workers", type=int, default=0)
    gp = sub.add_parser("gpu")
    gp.add_argument("--device", default="cuda")
    gp.add_argument("--student", default="resnet50")
    gp.add_argument("--teacher", default="resnet101")
    gp.add_argument("--size", type=int, nargs=2, default=[800, 1344], metavar=("H", "W"),
                    help="input size (1333 rounded up to the padding multiple of 32)")
    gp.add_argument("--batch", type=int, default=2)
    gp.add_argument("--warmup", type=int, default=5)
    gp.add_argument("--steps", type=int, default=20)
    gp.add_argument("--compile", action="store_true", help="also time torch.compile (long warm-up)")
    args = p.parse_args()
    cpu(args) if args.cmd == "cpu" else gpu(args)


if __name__ == "__main__":
    main()
