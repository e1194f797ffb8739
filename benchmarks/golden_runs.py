"""Golden runs: tiny train / distil / eval / export runs of every family, reduced to fingerprints.

A refactor that must not change what kdctl computes is checked by running this before and after
and comparing the two JSON files (``--compare``): every weight tensor's SHA-256, every logged
loss, every COCO metric and the ONNX file's scores must be bit-identical. With ``--checkpoints``
the runs' checkpoints of a previous tree are evaluated by the current one (old files load and
score the same).

    python benchmarks/golden_runs.py --out /tmp/golden-before            # on the old tree
    python benchmarks/golden_runs.py --out /tmp/golden-after --compare /tmp/golden-before/golden.json \
        --checkpoints /tmp/golden-before

Per family: a teacher trained a few steps, a student distilled from it with crosskd + pred_mimic +
ssim + pkd + feat_l2 at once, both evaluated, the student exported end to end to ONNX and that
file evaluated. One thread, no workers: the figures depend only on the code.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

METHODS = "crosskd,pred_mimic,ssim,pkd,feat_l2"
TINY = ["data.shapes.train_images=16", "data.shapes.val_images=8", "data.shapes.image_size=160",
        "data.short_side=160", "data.max_side=160", "data.batch_size=4", "data.num_workers=0",
        "train.epochs=2", "train.warmup_iters=2", "train.eval_every=1", "train.log_every=1",
        "runtime.threads=1", "eval.score_thr=0.001"]


def sides(family: str) -> list[str]:
    """Per-family overrides: the same small detector for teacher and student (CrossKD fits)."""
    out = []
    for side in ("teacher", "student"):
        if family == "yolo":
            out += [f"model.{side}.backbone=cspelan_n", f"model.{side}.yolo.width=0.125"]
        else:
            out += [f"model.{side}.head={family}", f"model.{side}.backbone=test_resnet",
                    f"model.{side}.fpn_channels=32", f"model.{side}.feat_channels=32"]
    return out


def weights_digest(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {k: hashlib.sha256(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(tensors.items())}


def losses_of(run: Path) -> list:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[1:] if line.strip()]
    # timings and memory vary from run to run; everything else is computed
    return [{k: v for k, v in r.items() if k not in ("img_s", "mem_mb", "train_s", "eval_s", "time", "elapsed")}
            for r in rows]


def invoke(args: list[str]) -> str:
    from typer.testing import CliRunner

    from kdctl.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exit_code != 0:
        sys.exit(f"kdctl {' '.join(map(str, args))} failed:\n{res.output}")
    return res.output


def evaluate(path: Path, out: Path) -> dict:
    invoke(["eval", path, "--json", out])
    return {k: v for k, v in json.loads(out.read_text()).items() if k != "model_file"}


def family_runs(family: str, root: Path) -> dict:
    recipe = "demo-yolo" if family == "yolo" else "demo"
    sets = [x for s in TINY + sides(family) for x in ("--set", s)]
    t, s = root / f"{family}-teacher", root / f"{family}-student"
    invoke(["train", recipe, "--model", "teacher", "--out", t, *sets])
    invoke(["distill", recipe, "--teacher", t / "best.safetensors", "--method", METHODS, "--out", s, *sets])
    onnx = root / f"{family}-student.onnx"
    invoke(["export", s / "best.safetensors", "--format", "onnx", "--end-to-end", "--out", onnx])
    return {
        "teacher": {"weights": weights_digest(t / "best.safetensors"), "log": losses_of(t),
                    "eval": evaluate(t / "best.safetensors", root / f"{family}-teacher-eval.json")},
        "student": {"weights": weights_digest(s / "best.safetensors"), "log": losses_of(s),
                    "eval": evaluate(s / "best.safetensors", root / f"{family}-student-eval.json")},
        "onnx_eval": evaluate(onnx, root / f"{family}-onnx-eval.json"),
    }


def old_checkpoints(old: Path, root: Path) -> dict:
    """The previous tree's checkpoints evaluated by this one."""
    return {p.name: evaluate(p / "best.safetensors", root / f"old-{p.name}-eval.json")
            for p in sorted(old.iterdir()) if (p / "best.safetensors").is_file()}


def differences(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--families", default=None, help="comma-separated (default: every family)")
    ap.add_argument("--compare", type=Path, help="a golden.json of a previous tree")
    ap.add_argument("--checkpoints", type=Path, help="a previous --out folder: evaluate its checkpoints here")
    args = ap.parse_args()
    from kdctl.models.families import FAMILIES

    args.out.mkdir(parents=True, exist_ok=True)
    names = args.families.split(",") if args.families else list(FAMILIES)
    result = {name: family_runs(name, args.out) for name in names}
    (args.out / "golden.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    failed = False
    if args.compare:
        before = json.loads(args.compare.read_text())
        diffs = differences({k: before[k] for k in result if k in before}, result)
        print(f"golden runs: {len(diffs)} differences against {args.compare}")
        print("\n".join(diffs[:40]))
        failed |= bool(diffs)
    if args.checkpoints:
        before = json.loads((args.checkpoints / "golden.json").read_text())
        old = old_checkpoints(args.checkpoints, args.out)
        for run, metrics in old.items():
            family, side = run.rsplit("-", 1)
            if family in before:
                diffs = differences(before[family][side]["eval"], metrics, run)
                print(f"old checkpoint {run}: {'same' if not diffs else diffs}")
                failed |= bool(diffs)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
