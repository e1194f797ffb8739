"""Distillation benchmarks: how much of the teacher-student gap each method closes, and what a
distillation step costs.

``efficacy`` — the fixed protocol of BENCHMARKS.md. One teacher checkpoint (``--teacher``, e.g.
the ``demo`` recipe's GFL-ResNet-14t trained with ``kdctl train demo --model teacher --set
train.epochs=16``), one student architecture (the recipe's ``model.student``), and for each
method in ``--methods`` and each seed in ``--seeds`` one ``kdctl distill RECIPE --teacher T
--method M --set train.seed=S`` run (a subprocess, exactly what a user runs; ``--jobs`` of them
at once with ``runtime.threads=--threads`` each). Nothing else changes between runs: same data,
schedule and evaluation, each method with its recipe defaults. A finished run (``last`` at the
final step) is not re-run, so an interrupted benchmark continues.

Reported per method: mean ± sample std over seeds of the **final** evaluation's AP, AP50, AP75
(not the best over evaluations), and the share of the gap closed,
``(AP_method - AP_none) / (AP_teacher - AP_none)`` with the means; the teacher's AP is its own
run's final evaluation (``--teacher-run``, default: the checkpoint's folder).

``overhead`` — seconds per training step (forward, losses, backward, AdamW step) of the
student alone vs with each method, on one fixed batch of the recipe's training data, in one
process: ``--warmup`` steps, then ``--rounds`` rounds in which every configuration runs
``--steps`` steps (order rotated each round); the median per-step time over rounds and its
ratio to the plain student's.

Examples::

    python benchmarks/bench_distill.py efficacy --teacher runs/teacher/best.safetensors --out runs/bench
    python benchmarks/bench_distill.py overhead --teacher runs/teacher/best.safetensors
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ["none", "pred_mimic", "feat_l2", "pkd", "ssim", "crosskd", "crosskd,ssim"]


# ============================================================================= efficacy
def _finished(run_dir: Path) -> bool:
    import yaml

    from kdctl.runs.summary import read_metrics

    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        return False
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    epochs = yaml.safe_load(recipe.read_text())["train"]["epochs"]
    return any(r["epoch"] + 1 == epochs for r in evals)


def _run_one(args, method: str, seed: int) -> tuple[str, int, float]:
    run_dir = Path(args.out) / f"{method.replace(',', '+')}-s{seed}"
    if _finished(run_dir):
        return method, seed, 0.0
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # an unfinished run starts over (resume would work too)
    cmd = [sys.executable, "-m", "kdctl", "distill", args.recipe, "--teacher", args.teacher, "--method", method,
           "--set", f"train.seed={seed}", "--set", f"runtime.threads={args.threads}", "--out", str(run_dir), "--json"]
    cmd += [x for s in args.set for x in ("--set", s)]
    t0 = time.perf_counter()
    log = (Path(args.out) / f"{run_dir.name}.log").open("w")
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log.name}")
    return method, seed, time.perf_counter() - t0


def _final_eval(run_dir: Path) -> dict:
    from kdctl.runs.summary import read_metrics

    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    if not evals:
        raise SystemExit(f"{run_dir}: no evaluation in metrics.jsonl")
    return max(evals, key=lambda r: r["step"])


def efficacy(args) -> None:
    from kdctl.runs.summary import summarize_run

    Path(args.out).mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        for method, seed, took in pool.map(lambda ms: _run_one(args, *ms), jobs):
            print(f"  {method:<14} seed {seed}: {'cached' if not took else f'{took:.0f} s'}", flush=True)
    wall = time.perf_counter() - t0

    teacher_run = Path(args.teacher_run or Path(args.teacher).parent)
    t_eval = _final_eval(teacher_run)
    rows = {}
    for method in args.methods:
        runs = [Path(args.out) / f"{method.replace(',', '+')}-s{s}" for s in args.seeds]
        finals = [_final_eval(r) for r in runs]
        rows[method] = {
            **{k: [100 * f[k] for f in finals] for k in ("AP", "AP50", "AP75")},
            "train_min": statistics.mean(summarize_run(r)["train_s"] / 60 for r in runs),
        }
    base = statistics.mean(rows["none"]["AP"]) if "none" in rows else None
    gap = 100 * t_eval["AP"] - base if base is not None else None

    def ms(v):
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    print(f"\nteacher {teacher_run}: AP {100 * t_eval['AP']:.1f}  AP50 {100 * t_eval['AP50']:.1f}  "
          f"AP75 {100 * t_eval['AP75']:.1f}")
    print(f"seeds {args.seeds}; {len(jobs)} runs, {wall / 60:.1f} min wall with {args.jobs} jobs\n")
    print("| method | AP | AP50 | AP75 | gap closed | train min/run |")
    print("|---|---|---|---|---|---|")
    for method, r in rows.items():
        closed = "—" if not gap or gap <= 0 or method == "none" else f"{100 * (statistics.mean(r['AP']) - base) / gap:.0f}%"
        print(f"| {method} | {ms(r['AP'])} | {ms(r['AP50'])} | {ms(r['AP75'])} | {closed} | {r['train_min']:.1f} |")
    result = {"teacher": {k: 100 * t_eval[k] for k in ("AP", "AP50", "AP75")}, "seeds": args.seeds, "methods": rows,
              "recipe": args.recipe, "set": args.set}
    (Path(args.out) / "efficacy.json").write_text(json.dumps(result, indent=1))


# ============================================================================= overhead
def first_batch(data, recipe, model):
    """The first training batch of ``data`` (the recipe's train split) in ``model``'s
    normalisation, without flips or shuffling: the fixed batch step timings run on."""
    from kdctl.data.transforms import build_transforms
    from kdctl.engine.loader import EpochBatchSampler, make_loader

    d = recipe.data
    data.transforms = build_transforms(True, short_side=d.short_side, max_side=d.max_side, hflip=False,
                                       mean=model.mean, std=model.std)
    sampler = EpochBatchSampler(len(data), d.batch_size, shuffle=False, seed=0, epoch=0)
    return next(iter(make_loader(data, sampler, num_workers=0, pad_divisor=d.pad_divisor)))


def overhead(args) -> None:
    import torch

    from kdctl.data import build_dataset
    from kdctl.distill.methods import build_distiller
    from kdctl.distill.trainer import build_teacher
    from kdctl.models.detector import build_detector
    from kdctl.recipe import load_recipe

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = {}
    for method in args.methods:
        names = [] if method == "none" else method.split(",")
        overrides = ["distill.losses=[" + ", ".join("{type: %s}" % n for n in names) + "]",
                     f"model.teacher_checkpoint={json.dumps(args.teacher)}", *args.set]
        recipe = load_recipe(args.recipe, overrides)
        torch.manual_seed(0)
        data = build_dataset(recipe.data, "train")
        student = build_detector(recipe.model.student, len(data.classes))
        teacher = build_teacher(recipe, data.classes) if names else None
        distiller = build_distiller(student, teacher, recipe.distill.losses).to(device).train()
        params = [p for p in distiller.parameters() if p.requires_grad]
        configs[method] = (distiller, torch.optim.AdamW(params, lr=1e-4))
    batch = first_batch(data, recipe, student).to(device)

    def step(distiller, opt):
        opt.zero_grad(set_to_none=True)
        sum(distiller(batch).values()).backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for distiller, opt in configs.values():
        for _ in range(args.warmup):
            step(distiller, opt)
    times = {m: [] for m in configs}
    order = list(configs)
    for r in range(args.rounds):
        for method in order[r % len(order):] + order[: r % len(order)]:
            distiller, opt = configs[method]
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(distiller, opt)
            sync()
            times[method].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times[args.methods[0]])
    print(f"batch {tuple(batch.images.shape)}, {args.threads} threads, device {device}")
    print("| method | s/step | × plain student |")
    print("|---|---|---|")
    for method, ts in times.items():
        print(f"| {method} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("efficacy", "overhead"):
        p = sub.add_parser(name)
        p.add_argument("--recipe", default="demo")
        p.add_argument("--teacher", required=True, help="kdctl checkpoint of the teacher")
        p.add_argument("--methods", nargs="+", default=METHODS, help="methods; 'a,b' combines two")
        p.add_argument("--set", nargs="*", default=[], help="extra recipe overrides for every run")
        p.add_argument("--threads", type=int, default=1 if name == "efficacy" else 2)
    e = sub.choices["efficacy"]
    e.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    e.add_argument("--jobs", type=int, default=2, help="runs at once")
    e.add_argument("--out", default="runs/bench-distill")
    e.add_argument("--teacher-run", default=None, help="the teacher's run directory (default: the checkpoint's folder)")
    o = sub.choices["overhead"]
    o.add_argument("--device", default="cpu")
    o.add_argument("--warmup", type=int, default=2)
    o.add_argument("--rounds", type=int, default=5)
    o.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    efficacy(args) if args.cmd == "efficacy" else overhead(args)


if __name__ == "__main__":
    main()
