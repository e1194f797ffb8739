"""Distilling from a teacher trained on other classes (a COCO teacher for a dataset of a few).

Feature methods (ssim, pkd, feat_l2, feat_l1) compare neck features and never look at classes:
the teacher is built with its own K_t classes and nothing is matched. Prediction methods
(crosskd, pred_mimic) compare classification logits class by class, so each of the student's K
classes needs one teacher class (``distill.class_map``: by name, or a dict).
:func:`restrict_classes` then cuts the teacher's ``head.cls_pred`` (each level's, where the head
has one per level) down to those K classes in the student's order, so that the teacher's own
predictions and CrossKD's cross-head path (the teacher's ``forward_from``, which ends in
``cls_pred``) both give ``[B, A*K, H, W]`` logits.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kdctl.classes import map_classes
from kdctl.errors import KdctlError
from kdctl.models.contract import MetaArchitecture

FEATURE_HINT = "use a feature method (ssim, pkd, feat_l2, feat_l1), which works with any teacher"


def resolve_class_map(student_classes: Sequence[str], teacher_classes: Sequence[str],
                      setting: str | Mapping[str, str] = "auto") -> list[int]:
    """The teacher class each student class mimics: ``[K]`` indices into ``teacher_classes``
    (``[K_t]`` names), in the student's class order (:func:`kdctl.classes.map_classes`: by name,
    or ``{student name: teacher name}`` with the rest by name; every student class must find
    one). Identical lists give ``[0, 1, ..., K-1]``. One-line KdctlError otherwise."""
    pairs = map_classes(student_classes, teacher_classes, setting, key="distill.class_map", side="teacher",
                        require_all=True, advice=FEATURE_HINT)
    return [pairs[i] for i in range(len(student_classes))]


def restrict_classes(teacher: MetaArchitecture, index: Sequence[int]) -> None:
    """Keep only the teacher classes ``index`` (``[K]`` indices into its K_t classes), in that
    order, in place, through the contract's class-row surgery (``keep_classes``). A dense
    teacher's ``head.cls_pred`` (``A*K_t`` output channels, anchor-major: channel ``a*K_t + k``)
    becomes a Conv2d of the ``A*K`` rows ``a*K_t + index[k]`` (weights and biases copied,
    nothing drawn from the random generator; per-level predictors each cut the same way), and
    its K becomes ``len(index)``: the head's ``"cls"`` ``[B, A*K, H, W]`` equals the full output
    at those channels. ``index == range(K_t)`` changes nothing."""
    teacher.keep_classes(index)


@dataclass(frozen=True)
class TeacherClasses:
    """How a teacher's classes meet the dataset's (:func:`plan_teacher_classes`).

    num_classes  K_t, what the teacher is built with (None: not stored; the dataset's K)
    names        the teacher's class names (checkpoint metadata ``classes``), None when not stored
    index        the teacher class of each student class, ``[K]`` (prediction methods, when the
                 classes differ: :func:`restrict_classes` applies it), or None: the teacher's head
                 is used as it is
    """

    num_classes: int | None
    names: list[str] | None
    index: list[int] | None

    def info(self, student_classes: Sequence[str]) -> dict | None:
        """``{"teacher_classes": K_t, "map": {student name: teacher name}}`` for the run plan, or
        None when the teacher's head is used as it is."""
        if self.index is None:
            return None
        return {"teacher_classes": self.num_classes,
                "map": {s: self.names[j] for s, j in zip(student_classes, self.index)}}


def stored_classes(meta: Mapping[str, str], num_classes: int | None) -> tuple[int | None, list[str] | None]:
    """(K_t, names) of a checkpoint: ``num_classes`` (the stored recipe's, when set) or the
    metadata's ``num_classes`` / ``classes`` (newline-joined names); None where not stored."""
    names = meta["classes"].split("\n") if meta.get("classes") else None
    count = meta.get("num_classes", "")
    k = num_classes or (int(count) if count.isdigit() else 0) or (len(names) if names else None)
    return k, names


def plan_teacher_classes(meta: Mapping[str, str], num_classes: int | None, source: str, *, predicts: bool,
                         student_classes: Sequence[str] | None, setting: str | Mapping[str, str]) -> TeacherClasses:
    """What the teacher in ``source`` (its checkpoint metadata ``meta``; ``num_classes``: its
    recipe's, or None) is built with and, when ``predicts`` (a prediction method is used),
    which teacher class each of ``student_classes`` mimics. Feature methods alone read no
    student classes. One-line KdctlError naming ``source`` when the classes cannot be matched."""
    k_t, names = stored_classes(meta, num_classes)
    if not predicts:
        return TeacherClasses(k_t, names, None)
    k = len(student_classes)
    if names is not None and len(names) != k_t:
        raise KdctlError(f"{source}: the teacher predicts {k_t} classes but its metadata names {len(names)}; the file "
                         "is damaged or hand-edited; " + FEATURE_HINT)
    if names is None:
        if isinstance(setting, Mapping) and setting:
            raise KdctlError(f"{source}: distill.class_map names teacher classes, but the checkpoint stores no "
                             "class names; remove distill.class_map, or " + FEATURE_HINT)
        if k_t is not None and k_t != k:
            raise KdctlError(f"{source}: the teacher predicts {k_t} classes and the dataset has {k}, and the checkpoint "
                             "stores no class names to match them by; use a teacher saved by kdctl, or " + FEATURE_HINT)
        return TeacherClasses(k_t, None, None)
    try:
        index = resolve_class_map(student_classes, names, setting)
    except KdctlError as exc:
        raise KdctlError(f"{source}: {exc}") from None
    return TeacherClasses(k_t, names, None if index == list(range(k_t)) else index)


def dataset_classes(data) -> list[str]:
    """The class names of a recipe's ``data`` section (:class:`~kdctl.recipe.DataConfig`), in
    label order, as cheaply as the format allows: from the section itself (shapes, VOC with
    ``data.classes``), else from the train split's files. COCO's categories and YOLO's ``names``
    do not depend on the images or boxes, so those are read unchecked (``skip_bad``, no image
    headers for COCO); the trainer still checks them when it loads the data."""
    from kdctl.data.shapes import SHAPE_CLASSES

    if data.format == "shapes" and data.shapes.num_classes <= len(SHAPE_CLASSES):
        return list(SHAPE_CLASSES[: data.shapes.num_classes])
    if data.format == "voc" and data.classes:
        return list(data.classes)
    from kdctl.data import build_dataset

    unchecked = data.model_copy(update={"skip_bad": data.skip_bad or data.format in ("coco", "yolo")})
    return list(build_dataset(unchecked, "train", check_images=False, require_images=False).classes)
