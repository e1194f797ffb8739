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

from dataclasses import dataclass

import torch
from torch import Tensor

from kdctl.analysis.conflict import (
    ConflictStats, Locations, RegressionStats, level_names, locate, per_location, student_targets, teacher_at_locations,
)
from kdctl.analysis.sides import Side, check_analysable, load_teachers
from kdctl.errors import KdctlError

QUALITY = ("teacher", "student", "one")


@torch.no_grad()
def analyze_conflict(teachers: list[str], student: str, data: str | None = None, *, student_checkpoint: str | None = None,
                     overrides: list[str] = (), split: str | None = "val", device: str | None = None, batch_size: int | None = None,
                     max_images: int | None = None, threshold: float = 0.5, floor: float = 0.05, per_class: bool = False,
                     quality: str = "teacher", visualize: int = 0, skip_bad: bool = False) -> tuple[dict, list[dict]]:
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
        skip_bad: skip unreadable images (counted in the report's ``data.unreadable``), as
            ``data.skip_bad`` does.

    Returns:
        (the report, a JSON-ready dict; the visualisation samples).
    """
    _check_arguments(teachers, student_checkpoint, quality, threshold, floor)
    setup = _load_student(student, data, student_checkpoint, overrides, split, device, skip_bad)
    sides = load_teachers(teachers, setup.student, setup.stored, len(setup.dataset.classes), setup.device)
    loader, n_images, bs = _data_loader(setup, max_images, batch_size)
    stats = _new_stats(setup.student, sides, threshold=threshold, floor=floor, per_class=per_class, device=setup.device)
    unreadable: list = []
    samples, sizes = _measure(loader, setup.student, sides, stats, quality, visualize, setup.device, unreadable)
    data_info = {"source": data if data is not None else f"{student} (recipe data)", "split": split or "all",
                 "images": n_images - len(unreadable), "classes": len(setup.dataset.classes),
                 "unreadable": [{"file": f, "reason": r} for f, r, _ in unreadable]}
    settings = {"threshold": threshold, "floor": floor, "per_class": per_class, "quality": quality,
                "batch_size": bs, "device": str(setup.device), "bins": 10}
    return _report(setup.student, sides, stats, sizes, data_info, settings), samples


def _check_arguments(teachers: list[str], student_checkpoint: str | None, quality: str, threshold: float,
                     floor: float) -> None:
    """Reject, before anything is loaded, what cannot run; the messages name the CLI options."""
    if not teachers:
        raise KdctlError("--teacher: give at least one teacher checkpoint")
    if quality not in QUALITY:
        raise KdctlError(f"--quality: expected one of {', '.join(QUALITY)}, got {quality!r}")
    if quality == "student" and not student_checkpoint:
        raise KdctlError("--quality student: the student's own boxes need --student-checkpoint")
    if not 0 <= threshold < 1 or not 0 <= floor < 1:
        raise KdctlError("--threshold and --floor must be in [0, 1)")


@dataclass
class _Setup:
    """What the student recipe (and checkpoint) decide: the device, the data and the student."""

    recipe: object  # kdctl.recipe.Recipe
    device: torch.device
    data_cfg: object  # kdctl.recipe.DataConfig, resized as the student's recipe says
    dataset: object  # transforms in the student's normalisation
    student: Side  # label: the recipe; checkpoint: the student checkpoint or None
    stored: object = None  # the student checkpoint's stored recipe (None without a checkpoint)


def _load_student(student: str, data: str | None, student_checkpoint: str | None, overrides: list[str],
                  split: str | None, device: str | None, skip_bad: bool) -> _Setup:
    """The student recipe, the device, the dataset resized as the recipe says, and the student:
    loaded from ``student_checkpoint`` (which must have the recipe's head) or built with random
    weights (only its priors and assigner are used then)."""
    from kdctl.data import build_dataset, data_config
    from kdctl.artifact.checkpoint import load_checkpoint_weights
    from kdctl.artifact.stored import load_detector, stored_detector_config
    from kdctl.evaluation.inference import val_transforms
    from kdctl.engine.device import pick_device
    from kdctl.models.detector import build_detector
    from kdctl.recipe import load_recipe

    recipe = load_recipe(student, list(overrides))
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    dev = pick_device(device or recipe.runtime.device)
    data_cfg = data_config(data, recipe.data, skip_bad=skip_bad)
    data_cfg = data_cfg.model_copy(update={"short_side": recipe.data.short_side, "max_side": recipe.data.max_side,
                                           "pad_divisor": recipe.data.pad_divisor})
    s_cfg = recipe.model.student
    check_analysable(s_cfg.head, student)
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
    return _Setup(recipe, dev, data_cfg, ds, Side(student, student_checkpoint, s_model), stored)


def _data_loader(setup: _Setup, max_images: int | None, batch_size: int | None) -> tuple[object, int, int]:
    """(the loader over the first ``max_images`` images, how many they are, the batch size)."""
    from torch.utils.data import Subset

    from kdctl.engine.loader import eval_loader

    ds, data_cfg = setup.dataset, setup.data_cfg
    n_images = len(ds) if max_images is None else min(len(ds), max_images)
    subset = ds if n_images == len(ds) else Subset(ds, range(n_images))
    bs = batch_size or setup.recipe.eval.batch_size
    loader = eval_loader(subset, batch_size=bs, num_workers=min(2, data_cfg.num_workers), pad_divisor=data_cfg.pad_divisor)
    return loader, n_images, bs


def _new_stats(student: Side, sides: list[Side], **opts) -> dict[str, dict]:
    """Empty statistics per teacher label: ``target`` and ``regression``, and with a student
    checkpoint ``student`` and (where CrossKD is attached) ``cross``. ``opts``: ConflictStats'."""
    V = student.model.neck.num_outs
    stats = {s.label: {"target": ConflictStats(V, **opts), "regression": RegressionStats(V, opts["device"])}
             for s in sides}
    if student.checkpoint:
        for s in sides:
            stats[s.label]["student"] = ConflictStats(V, **opts)
            if s.crosskd is not None:
                stats[s.label]["cross"] = ConflictStats(V, **opts)
    return stats


@dataclass
class _StudentBatch:
    """The student's side of one batch, shared by every teacher."""

    assignment: object  # kdctl.models.assigners.Assignment [B, N]
    loc: Locations
    scores: Tensor | None = None  # [B, L, K] the student checkpoint's sigmoid scores at its locations
    boxes: Tensor | None = None  # [B, L, 4] its decoded boxes there (xyxy pixels)
    mid: object = None  # its tower features at CrossKD's reuse_idx


def _measure(loader, student: Side, sides: list[Side], stats: dict[str, dict], quality: str, visualize: int,
             device, unreadable: list) -> tuple[list[dict], list[tuple[int, int]] | None]:
    """One pass over ``loader`` adding every batch to ``stats``. Returns the visualisation samples
    of the first ``visualize`` images and the FPN level sizes (h, w) of the first batch; images
    that failed to decode (``data.skip_bad``) are left out and appended to ``unreadable``."""
    from kdctl.progressbar import track

    s_model = student.model
    A_s = s_model.prior_generator.anchors_per_location
    reuse = max((s.crosskd.reuse_idx for s in sides if s.crosskd is not None), default=0)
    samples: list[dict] = []
    sizes0 = None
    for batch in track(loader, "analyze-conflict", total=len(loader)):
        unreadable.extend(batch.unreadable)
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        images = batch.images
        s_out, s_mid, t_outs = _forward(images, student, sides, reuse)
        sizes = _level_sizes(student, sides, s_out, t_outs)
        sizes0 = sizes0 or sizes
        priors = s_model.prior_generator(sizes, images.device)
        flat = s_model.flat_outputs(s_out) if s_out is not None else None
        assignment = s_model.assign(priors, batch, flat)
        loc = locate(assignment, priors, A_s, batch.valid_sizes, batch.scales, s_model.prior_generator.point_offset)
        s_batch = _StudentBatch(assignment, loc, mid=s_mid)
        take = max(0, min(len(batch), visualize - len(samples)))
        vis = _visual(images, batch, take, s_model.mean, s_model.std) if take else []
        if flat is not None:
            s_scores = flat["cls"].float().sigmoid()
            s_box_all = s_model.decoder.decode(flat["reg"].float(), priors)
            s_batch.scores, s_batch.boxes = teacher_at_locations(s_scores, s_box_all, A_s, loc.labels)
        for side, (out, t_mid) in zip(sides, t_outs):
            target, t_loc = _measure_teacher(side, out, t_mid, s_model, s_batch, quality, stats[side.label])
            for i, sample in enumerate(vis):
                d = (target[i] - t_loc[i]).abs().amax(-1)
                sample["maps"][side.label] = {
                    "target": target[i].amax(-1).cpu(), "teacher": t_loc[i].amax(-1).cpu(), "discrepancy": d.cpu(),
                    "valid": loc.valid[i].cpu(),
                }
        for sample in vis:
            sample.update(sizes=sizes, strides=s_model.strides[:len(sizes)], point_offset=s_model.prior_generator.point_offset)
        samples.extend(vis)
    return samples, sizes0


def _forward(images: Tensor, student: Side, sides: list[Side], reuse: int):
    """(the student checkpoint's head outputs and tower features at ``reuse``, or None, None
    without a checkpoint; every teacher's (head outputs, tower features), on its own input)."""

    s_model = student.model
    s_out = s_mid = None
    if student.checkpoint:
        s_out, s_mid = s_model.head.forward_with_tower(s_model.features(images), reuse)
    t_outs = []
    for side in sides:
        t_feats = side.model.features(side.input(images))[:side.levels]  # the student's levels (sides._student_levels)
        t_outs.append(side.model.head.forward_with_tower(t_feats, reuse if side.crosskd is not None else 0))
    return s_out, s_mid, t_outs


def _level_sizes(student: Side, sides: list[Side], s_out, t_outs) -> list[tuple[int, int]]:
    """The FPN level sizes (h, w) of the first teacher; every detector must have the same, since
    they are compared location by location."""
    sizes = [tuple(x.shape[-2:]) for x in t_outs[0][0]["cls"]]
    for where, out in [(s.checkpoint, o) for s, (o, _) in zip(sides, t_outs)] + [(student.checkpoint, s_out)]:
        if out is not None and [tuple(x.shape[-2:]) for x in out["cls"]] != sizes:
            raise KdctlError(f"{where}: the detector's FPN levels have other sizes than the first teacher's")
    return sizes


def _measure_teacher(side: Side, out: dict, t_mid, s_model, s: _StudentBatch, quality: str,
                     st: dict) -> tuple[Tensor, Tensor]:
    """Add one teacher's batch to its statistics ``st``: its scores against the student's targets,
    its boxes at the student's positives, and against the student's own and cross-head scores
    where measured. Returns (the student's targets, the teacher's scores), both ``[B, L, K]``."""
    t = side.model
    A_s = s_model.prior_generator.anchors_per_location
    flat = t.flat_outputs(out)
    t_pri = t.priors(out)
    A_t = t.prior_generator.anchors_per_location
    t_scores = flat["cls"].float().sigmoid()
    t_loc, t_box = teacher_at_locations(t_scores, t.decoder.decode(flat["reg"].float(), t_pri), A_t, s.loc.labels)
    qbox = {"teacher": t_box, "student": s.boxes, "one": None}[quality]
    target = student_targets(s_model.detection_loss, s.assignment, A_s, qbox)
    st["target"].add(target, t_loc, s.loc)
    st["regression"].add(t_box, s.loc)
    if s.scores is not None:
        st["student"].add(s.scores, t_loc, s.loc)
    if side.crosskd is not None:
        cross = t.flat_outputs(side.crosskd.cross_predictions(s.mid, t_mid, t.head))
        x_loc = per_location(cross["cls"].float().sigmoid(), A_t).amax(dim=2)
        st["cross"].add(x_loc, t_loc, s.loc)
    return target, t_loc


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


def _report(student: Side, sides: list[Side], stats: dict[str, dict], sizes: list[tuple[int, int]] | None,
            data_info: dict, settings: dict) -> dict:
    """The JSON-ready report: the student, the data, the settings, the FPN levels and a summary
    of every teacher's statistics (with its notes)."""
    s_model = student.model
    target_kind = "one-hot"
    if s_model.family.assigner == "task-aligned":
        # yolo: the target is the assigner's own soft score (kdctl.models.tal), whatever --quality says
        target_kind = "TOOD alignment score (the task-aligned assigner's soft target)"
    elif s_model.detection_loss.quality_target:
        target_kind = {"teacher": "QFL IoU with the teacher's box", "student": "QFL IoU with the student's own box",
                       "one": "one-hot (QFL with a perfect box)"}[settings["quality"]]
    report = {
        "student": {"recipe": student.label, "head": s_model.family.name, "assigner": s_model.family.assigner,
                    "priors_per_location": s_model.prior_generator.anchors_per_location,
                    "checkpoint": student.checkpoint, "target": target_kind},
        "data": data_info,
        "settings": settings,
        "levels": {name: {"stride": s_model.strides[i], "size": list(sizes[i]) if sizes else None}
                   for i, name in enumerate(level_names(s_model.neck.num_outs))},
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
    return report
