"""``kdctl analyze-conflict``: run teachers over a dataset and measure, at every location of the
student's FPN grid, how far each teacher's scores are from the targets the **student's**
assigner gives (see :mod:`kdctl.analysis.conflict` for the exact rule).

One pass over the data: per batch the student's assignment is computed once (its own priors and
assigner) and every teacher runs on the same images, renormalised from
the student's input normalisation to the teacher's as in distillation
(:class:`kdctl.distill.distiller.Distiller`). With a distilled student checkpoint the student's
own scores and its CrossKD cross-head scores are compared with the teacher's too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kdctl.analysis.conflict import (
    ConflictStats, RegressionStats, level_names, locate, per_location, student_targets, teacher_at_locations,
)
from kdctl.errors import KdctlError

QUALITY = ("teacher", "student", "one")


@dataclass
class Side:
    """A detector taking part: the model, how its input is mapped from the student's
    normalisation, and where it came from."""

    label: str
    checkpoint: str | None
    model: object
    scale: Tensor | None = None  # [1, 3, 1, 1] or None (same normalisation as the student)
    shift: Tensor | None = None
    crosskd: object = None  # kdctl.distill.crosskd.CrossKD when cross-head predictions are measured
    notes: list[str] = field(default_factory=list)

    def input(self, images: Tensor) -> Tensor:
        return images if self.scale is None else images * self.scale + self.shift


def _label(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem


def _renorm(student, teacher, device) -> tuple[Tensor | None, Tensor | None]:
    """The distiller's mapping of the student's input normalisation to the teacher's."""
    from kdctl.distill.distiller import input_map

    mapping = input_map(student, teacher)
    return (None, None) if mapping is None else (mapping[0].to(device), mapping[1].to(device))


def _crosskd(student: Side, stored_recipe, teacher: Side) -> None:
    """Attach CrossKD (reuse_idx and adapters as the student was trained) to ``teacher``, or a
    note saying why its cross-head predictions are skipped."""
    from kdctl.distill.crosskd import CrossKD
    from kdctl.engine.checkpoint import load_train_state, resolve_checkpoint

    s, t = student.model, teacher.model
    if s.family.name != t.family.name:
        teacher.notes.append(f"cross-head predictions skipped: CrossKD runs the student's head features through the "
                             f"teacher's head, which needs the student's head type ({s.family.name!r}); this teacher is "
                             f"{t.family.name!r}")
        return
    cfg = next((c for c in stored_recipe.distill.losses if c.type == "crosskd"), None)
    reuse = s.family.reuse_idx if cfg is None or cfg.reuse_idx is None else cfg.reuse_idx
    if reuse > min(s.head.num_blocks, t.head.num_blocks):
        teacher.notes.append(f"cross-head predictions skipped: reuse_idx {reuse} is past the head towers")
        return
    module = CrossKD(s.head, t.head, s.family.kd, s.decoder, reuse, "auto" if cfg is None else cfg.adapter)
    if module.adapters is not None:
        # the adapters are trained with the student but kept in its .state.pt, not its weights
        ckpt = resolve_checkpoint(student.checkpoint)
        name = ckpt.name.removesuffix(".safetensors")
        state_file = ckpt.with_name(name + ".state.pt")
        kd = {}
        if state_file.is_file():  # read with torch.load(weights_only=True)
            state = load_train_state(ckpt.parent, name, None)
            kd = {k.removeprefix("crosskd."): v for k, v in (state.get("extra", {}).get("kd", {}) or {}).items()
                  if k.startswith("crosskd.")}
        if not kd:
            teacher.notes.append(f"cross-head predictions skipped: the head widths differ, and the adapters trained "
                                 f"with the student are not in {state_file}")
            return
        module.load_state_dict(kd)
    if cfg is None:
        teacher.notes.append("the student checkpoint's recipe has no crosskd loss: cross-head predictions use "
                             f"reuse_idx {reuse} through an untrained pairing")
    used = getattr(stored_recipe.model, "teacher_checkpoint", None)
    if used and Path(used).resolve() != resolve_checkpoint(teacher.checkpoint).resolve():
        teacher.notes.append(f"the student was distilled from {used}, not from this teacher")
    teacher.crosskd = module.to(next(t.parameters()).device).eval()


def _visual(images: Tensor, batch, take: int, mean, std) -> list[dict]:
    """Photos (uint8 HWC, unpadded) and GT boxes of the first ``take`` images of a batch."""
    m = torch.tensor(mean).view(3, 1, 1)
    sd = torch.tensor(std).view(3, 1, 1)
    out = []
    for i in range(take):
        h, w = (int(v) for v in batch.valid_sizes[i])
        img = (images[i, :, :h, :w].cpu() * sd + m).clamp(0, 1).mul(255).round().to(torch.uint8)
        out.append({"image_id": int(batch.image_ids[i]), "image": img.permute(1, 2, 0).numpy(),
                    "boxes": batch.boxes[i][batch.gt_mask[i]].cpu().tolist(), "maps": {}})
    return out


@torch.no_grad()
def analyze_conflict(teachers: list[str], student: str, data: str | None = None, *, student_checkpoint: str | None = None,
                     overrides: list[str] = (), split: str | None = "val", device: str | None = None, batch_size: int | None = None,
                     max_images: int | None = None, threshold: float = 0.5, floor: float = 0.05, per_class: bool = False,
                     quality: str = "teacher", visualize: int = 0) -> tuple[dict, list[dict]]:
    """Measure the target conflict of each teacher against the student of recipe ``student``.

    Args:
        teachers: kdctl checkpoints (their stored recipes say what they are).
        student: a recipe (name or file) whose ``model.student`` gives the assigner, the priors
            and the input normalisation; its ``data`` gives the resize (and the data when
            ``data`` is None).
        student_checkpoint: a (distilled) student; adds the student's and the cross-head
            predictions' discrepancy to each teacher.
        quality: GFL students' soft target at positives: IoU with the ``teacher``'s box at the
            location, with the ``student``'s own box (needs ``student_checkpoint``), or ``one``
            (a perfect box: one-hot). Focal-loss students always use one-hot targets.
        threshold, floor, per_class: see :mod:`kdctl.analysis.conflict`.
        visualize: keep the maps of the first N images for :func:`kdctl.analysis.plot.write_visualizations`.

    Returns:
        (the report, a JSON-ready dict; the visualisation samples).
    """
    from torch.utils.data import Subset

    from kdctl.data import build_dataset, data_config_from_arg
    from kdctl.distill.crosskd import run_head
    from kdctl.engine.checkpoint import load_checkpoint_weights
    from kdctl.engine.inference import load_detector, stored_detector_config, val_transforms
    from kdctl.engine.loader import eval_loader
    from kdctl.engine.runtime import pick_device
    from kdctl.models.detector import build_detector
    from kdctl.progress import track
    from kdctl.recipe import load_recipe

    if not teachers:
        raise KdctlError("--teacher: give at least one teacher checkpoint")
    if quality not in QUALITY:
        raise KdctlError(f"--quality: expected one of {', '.join(QUALITY)}, got {quality!r}")
    if quality == "student" and not student_checkpoint:
        raise KdctlError("--quality student: the student's own boxes need --student-checkpoint")
    if not 0 <= threshold < 1 or not 0 <= floor < 1:
        raise KdctlError("--threshold and --floor must be in [0, 1)")
    recipe = load_recipe(student, list(overrides))
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    dev = pick_device(device or recipe.runtime.device)
    data_cfg = recipe.data if data is None else data_config_from_arg(data)
    data_cfg = data_cfg.model_copy(update={"short_side": recipe.data.short_side, "max_side": recipe.data.max_side,
                                           "pad_divisor": recipe.data.pad_divisor})
    s_cfg = recipe.model.student
    stored = s_model = None
    if student_checkpoint:
        _, meta = load_checkpoint_weights(student_checkpoint, tensors=False)
        ckpt_cfg, stored = stored_detector_config(student_checkpoint, meta)
        if ckpt_cfg.head != s_cfg.head:
            raise KdctlError(f"{student_checkpoint}: the checkpoint is a {ckpt_cfg.head!r} detector but {student}'s "
                             f"student is {s_cfg.head!r}; give the recipe the student was trained with")
        s_model, _, _ = load_detector(student_checkpoint, device=dev)
    ds = build_dataset(data_cfg, split, transforms=None)
    K = len(ds.classes)
    if s_model is None:
        s_model = build_detector(s_cfg.model_copy(update={"pretrained": None, "weights": None}), K).to(dev).eval()
    elif s_model.num_classes != K:
        raise KdctlError(f"{student_checkpoint}: the student predicts {s_model.num_classes} classes but the data has {K}")
    ds.transforms = val_transforms(data_cfg, s_model.mean, s_model.std)
    stu = Side(student, student_checkpoint, s_model)
    A_s = s_model.prior_generator.anchors_per_location

    sides: list[Side] = []
    for path in teachers:
        model, _, _ = load_detector(path, device=dev)
        if model.num_classes != K:
            raise KdctlError(f"{path}: the teacher predicts {model.num_classes} classes but the data has {K}; "
                             "analyze on the data it was trained for")
        side = Side(_label(path), str(path), model, *_renorm(s_model, model, dev))
        if student_checkpoint:
            _crosskd(stu, stored, side)
        sides.append(side)
    labels = [s.label for s in sides]
    for i, s in enumerate(sides):  # same run name twice: tell them apart
        if labels.count(s.label) > 1:
            s.label = f"{s.label}#{i + 1}"

    n_images = len(ds) if max_images is None else min(len(ds), max_images)
    subset = ds if n_images == len(ds) else Subset(ds, range(n_images))
    bs = batch_size or recipe.eval.batch_size
    loader = eval_loader(subset, batch_size=bs, num_workers=min(2, data_cfg.num_workers), pad_divisor=data_cfg.pad_divisor)
    V = s_model.neck.num_outs
    opts = {"threshold": threshold, "floor": floor, "per_class": per_class, "device": dev}
    stats = {s.label: {"target": ConflictStats(V, **opts), "regression": RegressionStats(V, dev)} for s in sides}
    if student_checkpoint:
        for s in sides:
            stats[s.label]["student"] = ConflictStats(V, **opts)
            if s.crosskd is not None:
                stats[s.label]["cross"] = ConflictStats(V, **opts)
    reuse = max((s.crosskd.reuse_idx for s in sides if s.crosskd is not None), default=0)
    samples: list[dict] = []
    sizes0 = None
    for batch in track(loader, "analyze-conflict", total=len(loader)):
        batch = batch.to(dev)
        images = batch.images
        s_out = s_mid = None
        if student_checkpoint:
            s_out, s_mid = run_head(s_model.head, s_model.features(images), reuse)
        t_outs = []
        for side in sides:
            t_feats = side.model.features(side.input(images))
            t_outs.append(run_head(side.model.head, t_feats, reuse if side.crosskd is not None else 0))
        sizes = [tuple(x.shape[-2:]) for x in t_outs[0][0]["cls"]]
        for where, out in [(s.checkpoint, o) for s, (o, _) in zip(sides, t_outs)] + [(student_checkpoint, s_out)]:
            if out is not None and [tuple(x.shape[-2:]) for x in out["cls"]] != sizes:
                raise KdctlError(f"{where}: the detector's FPN levels have other sizes than the first teacher's")
        sizes0 = sizes0 or sizes
        priors = s_model.prior_generator(sizes, images.device)
        assignment = s_model.assign(priors, batch, s_model.flat_outputs(s_out) if s_out is not None else None)
        loc = locate(assignment, priors, A_s, batch.valid_sizes, batch.scales, s_model.prior_generator.point_offset)
        take = max(0, min(len(batch), visualize - len(samples)))
        vis = _visual(images, batch, take, s_model.mean, s_model.std) if take else []
        s_loc = s_box = None
        if s_out is not None:
            flat = s_model.flat_outputs(s_out)
            s_scores = flat["cls"].float().sigmoid()
            s_box_all = s_model.decoder.decode(flat["reg"].float(), priors)
            s_loc, s_box = teacher_at_locations(s_scores, s_box_all, A_s, loc.labels)
        for side, (out, t_mid) in zip(sides, t_outs):
            t = side.model
            flat = t.flat_outputs(out)
            t_pri = t.priors(out)
            A_t = t.prior_generator.anchors_per_location
            t_scores = flat["cls"].float().sigmoid()
            t_loc, t_box = teacher_at_locations(t_scores, t.decoder.decode(flat["reg"].float(), t_pri), A_t, loc.labels)
            qbox = {"teacher": t_box, "student": s_box, "one": None}[quality]
            target = student_targets(s_model.detection_loss, assignment, A_s, qbox)
            st = stats[side.label]
            st["target"].add(target, t_loc, loc)
            st["regression"].add(t_box, loc)
            if s_loc is not None:
                st["student"].add(s_loc, t_loc, loc)
            if side.crosskd is not None:
                cross = t.flat_outputs(side.crosskd.cross_predictions(s_mid, t_mid, t.head))
                x_loc = per_location(cross["cls"].float().sigmoid(), A_t).amax(dim=2)
                st["cross"].add(x_loc, t_loc, loc)
            for i, sample in enumerate(vis):
                d = (target[i] - t_loc[i]).abs().amax(-1)
                sample["maps"][side.label] = {
                    "target": target[i].amax(-1).cpu(), "teacher": t_loc[i].amax(-1).cpu(), "discrepancy": d.cpu(),
                    "valid": loc.valid[i].cpu(),
                }
        for sample in vis:
            sample.update(sizes=sizes, strides=s_model.strides[:len(sizes)], point_offset=s_model.prior_generator.point_offset)
        samples.extend(vis)

    target_kind = "one-hot"
    if s_model.family.name == "gfl":
        target_kind = {"teacher": "QFL IoU with the teacher's box", "student": "QFL IoU with the student's own box",
                       "one": "one-hot (QFL with a perfect box)"}[quality]
    report = {
        "student": {"recipe": student, "head": s_model.family.name, "assigner": s_model.family.assigner,
                    "priors_per_location": A_s, "checkpoint": student_checkpoint, "target": target_kind},
        "data": {"source": data if data is not None else f"{student} (recipe data)", "split": split or "all", "images": n_images,
                 "classes": K},
        "settings": {"threshold": threshold, "floor": floor, "per_class": per_class, "quality": quality,
                     "batch_size": bs, "device": str(dev), "bins": 10},
        "levels": {name: {"stride": s_model.strides[i], "size": list(sizes0[i]) if sizes0 else None}
                   for i, name in enumerate(level_names(V))},
        "teachers": [],
    }
    for side in sides:
        st = stats[side.label]
        t = side.model
        report["teachers"].append({
            "label": side.label, "checkpoint": side.checkpoint, "head": t.family.name, "backbone": t.backbone.name,
            "assigner": t.family.assigner, "assigns_like_student": t.family.assigner == s_model.family.assigner,
            "priors_per_location": t.prior_generator.anchors_per_location,
            "target": st["target"].summary(), "regression": st["regression"].summary(),
            "student": st["student"].summary() if "student" in st else None,
            "cross": st["cross"].summary() if "cross" in st else None,
            "notes": side.notes,
        })
    return report, samples
