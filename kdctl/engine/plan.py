"""The plan of a run: what ``kdctl train`` / ``kdctl distill`` are about to do, before the first
step (and all that ``--dry-run`` does). A JSON-ready dict, printed by the CLI and written as the
first ``{"kind": "plan"}`` record of ``metrics.jsonl``.

Keys: ``command`` ("train" or "distill"), ``model`` (which of the recipe's models is trained),
``detector`` (the trained detector: family, backbone, parameters, classes; ``init``: what
``init_from`` loaded), ``teacher`` and ``methods`` (distillation: the frozen teacher and the KD
methods with their weights), ``class_map`` (when the teacher's classes differ), ``schedule``
(epochs, steps, batch, optimizer, lr, warm-up; ``ema``: ``train.ema``'s decay and tau, or None) and
``run_dir``.
"""
from __future__ import annotations

from torch import nn

SHOWN_CLASSES = 12  # class names listed in the plan; the count is always given


def describe_detector(model: nn.Module, classes: list[str] | None = None) -> dict:
    """Family, backbone, parameter count (all / trainable) and classes of a detector."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"family": model.family.name, "backbone": model.backbone.name, "params": params, "trainable": trainable,
           "num_classes": model.num_classes}
    if classes is not None:
        out["classes"] = list(classes[:SHOWN_CLASSES])
    return out


def describe_methods(distiller: nn.Module) -> list[dict]:
    """Each KD method of a :class:`~kdctl.distill.distiller.Distiller` with its weights, what it
    reads and whether it has adapters."""
    rows = []
    for name, method in distiller.methods.items():
        row = {"type": name, "reads": sorted(method.reads)}
        options = getattr(method, "options", None)
        if options is not None:  # prediction methods: weight, cls/reg weights resolved from the family
            spec = method.spec
            row.update(weight=options["weight"],
                       cls_weight=spec.cls_weight if options["cls_weight"] is None else options["cls_weight"],
                       reg_weight=spec.reg_weight if options["reg_weight"] is None else options["reg_weight"])
        else:
            row["weight"] = method.weight
        if "tower" in method.reads:
            row["reuse_idx"] = method.tower_idx
        row["adapters"] = getattr(method, "adapters", None) is not None
        rows.append(row)
    return rows


def run_plan(trainer) -> dict:
    """The plan of a built :class:`~kdctl.engine.trainer.Trainer` (or ``DistillTrainer``)."""
    r, d, t = trainer.recipe, trainer.recipe.data, trainer.recipe.train
    distiller = trainer.parts.step if hasattr(trainer.parts.step, "methods") else None
    plan = {"command": "distill" if distiller is not None else "train", "model": trainer.which,
            "detector": describe_detector(trainer.model, trainer.train_set.classes)}
    init = trainer.parts.info.get("init")
    if init:
        plan["detector"]["init"] = init
    if distiller is not None:
        teacher = distiller.teacher
        plan["teacher"] = None if teacher is None else {
            **describe_detector(teacher), "checkpoint": r.model.teacher_checkpoint or (r.model.teacher and r.model.teacher.weights)}
        plan["methods"] = describe_methods(distiller)
        if trainer.parts.info.get("class_map"):
            plan["class_map"] = trainer.parts.info["class_map"]
    plan["data"] = {"format": d.format, "train_images": len(trainer.train_set), "val_images": len(trainer.val_set),
                    "size": [d.short_side, d.max_side]}
    if d.augment is not None:  # data.augment (kdctl.data.augment); absent when off
        plan["data"]["augment"] = d.augment.model_dump(mode="json")
    plan["schedule"] = {"epochs": t.epochs, "steps_per_epoch": trainer.steps_per_epoch, "total_steps": trainer.total_steps,
                        "max_steps": trainer.max_steps, "batch": d.batch_size * trainer.dist.world_size,
                        "processes": trainer.dist.world_size, "optimizer": t.optimizer, "lr": trainer.lr,
                        "schedule": t.schedule, "warmup_iters": t.warmup_iters, "amp": t.amp, "device": str(trainer.device),
                        "ema": None if t.ema is None else t.ema.model_dump()}
    plan["run_dir"] = str(trainer.run_dir)
    return plan
