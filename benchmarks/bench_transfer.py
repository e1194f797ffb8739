"""Does starting from a teacher with more classes help? ``init_from`` vs from scratch, same epochs.

Protocol (all through the real CLI, so what is measured is what a user runs):

1. a "published" teacher: ``kdctl train demo --model teacher`` (GFL ResNet-14t, 4 shape classes)
   on other images than the target data (``data.shapes.seed=100``), ``--big-epochs`` epochs;
2. the target data: the ``demo`` images (seed 0) with 2 of the classes in another order,
   ``kdctl data export-coco demo ... --classes star,circle`` (train and val);
3. for each seed: ``kdctl train`` the same detector on the target data for ``--epochs`` epochs,
   once with ``model.teacher.init_from`` = the big teacher (class rows copied by name) and once
   from scratch (``train.seed`` = the seed; the same schedule);
4. best COCO AP of each run; mean and per-seed values.

    python benchmarks/bench_transfer.py --epochs 3 --seeds 0 1 2 --out /work/bench-out/transfer
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """extends: demo
data:
  format: coco
  path: {out}/data/train.json
  val_path: {out}/data/val.json
"""


def kdctl(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-m", "kdctl", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"kdctl {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def best_ap(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return max(r["AP"] for r in rows if r.get("kind") == "eval" and r.get("AP") is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench-transfer")
    ap.add_argument("--big-epochs", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--classes", default="star,circle")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    common = ["--set", f"runtime.threads={args.threads}", "--set", "data.num_workers=0"]
    big = out / "big-teacher"
    if not (big / "best.safetensors").is_file():
        kdctl("train", "demo", "--model", "teacher", "--set", "data.shapes.seed=100", "--set", f"train.epochs={args.big_epochs}",
              "--set", f"train.eval_every={args.big_epochs}", *common, "--out", str(big), threads=args.threads)
    for split in ("train", "val"):
        if not (out / "data" / f"{split}.json").is_file():
            kdctl("data", "export-coco", "demo", str(out / "data" / f"{split}.json"), "--split", split,
                  "--classes", args.classes, threads=args.threads)
    recipe = out / "target.yaml"
    recipe.write_text(RECIPE.format(out=out))
    aps: dict[str, list[float]] = {"init_from": [], "scratch": []}
    for seed in args.seeds:
        for name in aps:
            run = out / f"{name}-{seed}"
            if not (run / "best.safetensors").is_file():
                extra = ["--set", f"model.teacher.init_from={big / 'best.safetensors'}"] if name == "init_from" else []
                kdctl("train", str(recipe), "--model", "teacher", "--set", f"train.epochs={args.epochs}",
                      "--set", f"train.seed={seed}", "--set", "train.eval_every=1", *common, *extra, "--out", str(run),
                      threads=args.threads)
            aps[name].append(100 * best_ap(run))
            print(f"seed {seed} {name}: AP {aps[name][-1]:.1f}", flush=True)
    big_ap = 100 * best_ap(big)
    print(f"\nbig teacher (4 classes, other images): AP {big_ap:.1f} on its own val split")
    print(f"target: {args.classes}, {args.epochs} epochs, seeds {args.seeds}")
    for name, values in aps.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<10} AP {statistics.mean(values):.1f} ± {sd:.1f}  ({', '.join(f'{v:.1f}' for v in values)})")
    (out / "result.json").write_text(json.dumps({"big_teacher_ap": big_ap, "epochs": args.epochs, "seeds": args.seeds,
                                                 "ap": aps}, indent=2))


if __name__ == "__main__":
    main()
