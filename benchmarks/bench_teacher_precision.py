"""How far a bf16 teacher moves the KD losses (``distill.teacher_amp``), on the CPU.

The official CrossKD teacher runs in fp32. kdctl's ``teacher_amp: auto`` ran the teacher under
bf16 autocast on CUDA. This measures, on batches of the recipe's training data, each KD loss and
the statistics CrossKD's ``align_scale`` copies from the teacher (per-channel mean and std of the
teacher's tower output at ``reuse_idx``) with the teacher in fp32 and under CPU bf16 autocast;
the student, batch and everything else are identical (the student runs in fp32 both times).

Reported per loss: the fp32 value, the largest relative change ``|bf16 - fp32| / |fp32|`` over
the batches; for the align statistics the median and the largest relative change over the
channels of every level and branch (a channel whose fp32 value is near 0 makes the largest
one large), the largest over batches.
The decision rule (kdctl issue: official-config parity): bf16 stays the default only if every
KD loss moves by less than 1e-2.

Example::

    python benchmarks/bench_teacher_precision.py --teacher runs/teacher/best.safetensors --batches 4
"""
from __future__ import annotations

import argparse
import json

METHODS = ["crosskd", "pred_mimic", "ssim", "pkd", "feat_l2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher checkpoint (e.g. the demo teacher)")
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from kdctl.data import build_dataset
    from kdctl.data.transforms import build_transforms
    from kdctl.distill.methods import build_distiller
    from kdctl.distill.trainer import build_teacher
    from kdctl.engine.loader import EpochBatchSampler, make_loader
    from kdctl.models.detector import build_detector
    from kdctl.recipe import load_recipe

    torch.set_num_threads(args.threads)
    overrides = ["distill.losses=[" + ", ".join("{type: %s}" % n for n in METHODS) + "]",
                 f"model.teacher_checkpoint={json.dumps(args.teacher)}"]
    recipe = load_recipe(args.recipe, overrides)
    torch.manual_seed(0)
    data = build_dataset(recipe.data, "train")
    student = build_detector(recipe.model.student, len(data.classes))
    teacher = build_teacher(recipe, data.classes)
    distiller = build_distiller(student, teacher, recipe.distill.losses).train()
    d = recipe.data
    data.transforms = build_transforms(True, short_side=d.short_side, max_side=d.max_side, hflip=False,
                                       mean=student.mean, std=student.std)
    sampler = EpochBatchSampler(len(data), d.batch_size, shuffle=False, seed=0, epoch=0)
    loader = iter(make_loader(data, sampler, num_workers=0, pad_divisor=d.pad_divisor))
    idx = distiller.tower_idx

    rel: dict[str, float] = {}
    ref_values: dict[str, list[float]] = {}
    for _ in range(args.batches):
        batch = next(loader)
        values, stats = {}, {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            distiller.teacher_amp = dtype
            torch.manual_seed(1)
            with torch.no_grad():
                values[name] = {k: float(v) for k, v in distiller(batch).items()}
                with distiller._teacher_autocast(batch.images.device):
                    feats = teacher.features(distiller.teacher_input(batch.images))
                    _, mid = teacher.head.forward_with_tower(feats, idx)
            # align_scale's statistics: per level and branch, per channel over (B, H, W)
            flat = [x.float().transpose(0, 1).flatten(1) for x in mid["cls"] + mid["reg"]]
            stats[name] = {"mean": torch.cat([f.mean(dim=1) for f in flat]), "std": torch.cat([f.std(dim=1) for f in flat])}
        for k, v in values["fp32"].items():
            if any(m in k for m in ("crosskd", "mimic", "ssim", "pkd", "feat")):
                change = abs(values["bf16"][k] - v) / max(abs(v), 1e-12)
                rel[k] = max(rel.get(k, 0.0), change)
                ref_values.setdefault(k, []).append(v)
        for s in ("mean", "std"):
            a, b = stats["fp32"][s], stats["bf16"][s]
            change = (b - a).abs() / a.abs().clamp(min=1e-6)  # per channel, level and branch
            for what, v in (("median", float(change.median())), ("max", float(change.max()))):
                key = f"align_scale teacher {s}, {what} over channels"
                rel[key] = max(rel.get(key, 0.0), v)

    worst_kd = max(v for k, v in rel.items() if not k.startswith("align"))
    result = {"batches": args.batches, "batch_shape": list(batch.images.shape), "relative_change": rel,
              "fp32_mean_value": {k: sum(v) / len(v) for k, v in ref_values.items()},
              "worst_kd_loss_change": worst_kd, "bf16_ok_by_the_1e-2_rule": worst_kd < 1e-2}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.batches} batches of {tuple(batch.images.shape)}; teacher {args.teacher}")
    print("| quantity | fp32 value (mean) | max relative change, bf16 teacher |")
    print("|---|---|---|")
    for k, v in rel.items():
        ref = result["fp32_mean_value"].get(k)
        print(f"| {k} | {'' if ref is None else f'{ref:.4g}'} | {v:.2e} |")
    print(f"worst KD loss change {worst_kd:.2e}: bf16 {'passes' if worst_kd < 1e-2 else 'fails'} the 1e-2 rule")


if __name__ == "__main__":
    main()
