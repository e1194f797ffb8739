"""Training-step time of this working tree against an earlier git revision, in one run.

For a refactor that must not cost speed: the base revision is exported (``git archive``) into a
temporary folder, and both trees run the same real command, ``python -m kdctl distill RECIPE
--method M --max-steps S`` (the plain student with ``--method none``), with ``PYTHONPATH`` set to
the tree. Rounds alternate the order of the two trees, so machine noise falls on both. The time
is the training time the run itself records (``train_s`` of its last metrics line: steps only,
no start-up, data set-up or evaluation), over ``S`` steps of ``data.batch_size`` images.

Reported per method: median img/s of each tree over the rounds and the median of the per-round
ratios work / base (above 1: the working tree is faster).

    python benchmarks/bench_revisions.py --base HEAD~1 --recipe demo --methods none crosskd ssim \\
        --steps 40 --rounds 3 --threads 2

The teacher (``--teacher``) is a kdctl checkpoint both trees can read; without it one is trained
first with the working tree (``kdctl train RECIPE --model teacher --max-steps 20``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def export_revision(rev: str, dest: Path) -> None:
    """``git archive REV`` of the repository unpacked into ``dest``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def kdctl(tree: Path, args: list[str], threads: int) -> None:
    """Run ``python -m kdctl ARGS`` from ``tree`` with that tree's package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-m", "kdctl", *args], cwd=tree, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"kdctl {' '.join(args)} failed in {tree}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def timed_run(tree: Path, out: Path, args, method: str, teacher: str) -> float:
    """img/s of ``args.steps`` distillation steps of ``method`` in ``tree``."""
    sets = [f"runtime.threads={args.threads}", f"train.log_every={args.steps}", "data.num_workers=0", *args.set]
    cmd = ["distill", args.recipe, "--method", method, "--teacher", teacher, "--max-steps", str(args.steps),
           "--out", str(out), *[x for s in sets for x in ("--set", s)]]
    kdctl(tree, cmd, args.threads)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [x for x in lines if x.get("kind") == "train"][-1]
    batch = yaml.safe_load((out / "recipe.yaml").read_text())["data"]["batch_size"]
    return args.steps * batch / last["train_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision to compare against (default HEAD)")
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--methods", nargs="+", default=["none", "crosskd", "ssim"])
    ap.add_argument("--teacher", default=None, help="kdctl teacher checkpoint (default: train a short one)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra recipe overrides for every run")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kdctl-bench-rev-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        base.mkdir()
        export_revision(args.base, base)
        trees = {"base": base, "work": ROOT}
        teacher = args.teacher
        if teacher is None:
            kdctl(ROOT, ["train", args.recipe, "--model", "teacher", "--max-steps", "20", "--out", str(tmp / "teacher"),
                         "--set", f"runtime.threads={args.threads}", "--set", "data.num_workers=0"], args.threads)
            teacher = str(tmp / "teacher" / "last.safetensors")
        speed = {m: {t: [] for t in trees} for m in args.methods}
        for r in range(args.rounds):
            for method in args.methods:
                order = list(trees) if r % 2 == 0 else list(reversed(trees))
                for name in order:
                    out = tmp / f"{name}-{method}-{r}"
                    speed[method][name].append(timed_run(trees[name], out, args, method, teacher))
                print(f"round {r + 1}/{args.rounds} {method}: " +
                      ", ".join(f"{t} {speed[method][t][-1]:.1f} img/s" for t in trees), flush=True)

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], capture_output=True, text=True).stdout.strip()
    print(f"\nworking tree vs {args.base} ({rev}), recipe {args.recipe}, {args.steps} steps x {args.rounds} rounds, "
          f"{args.threads} threads")
    print(f"{'method':<16}{'base img/s':>12}{'work img/s':>12}{'work/base':>11}")
    result = {"base": args.base, "base_commit": rev, "recipe": args.recipe, "steps": args.steps, "rounds": args.rounds,
              "threads": args.threads, "methods": {}}
    for method, by_tree in speed.items():
        ratio = statistics.median(w / b for w, b in zip(by_tree["work"], by_tree["base"]))
        b, w = statistics.median(by_tree["base"]), statistics.median(by_tree["work"])
        print(f"{method:<16}{b:>12.1f}{w:>12.1f}{ratio:>11.3f}")
        result["methods"][method] = {"base_img_s": by_tree["base"], "work_img_s": by_tree["work"], "ratio_median": ratio}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
