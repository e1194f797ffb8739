"""``kdctl distill``: the training engine with a :class:`~kdctl.distill.distiller.Distiller`.

Everything about the loop, checkpoints, resume and evaluation is :class:`Trainer`'s; this
subclass only builds its parts (:meth:`DistillTrainer.build_parts`): the student, the teacher,
the KD methods and the :class:`Distiller` that computes the step's losses; the methods'
adapters are the training-only extra parts (optimised and in the resume state, not in the
student's checkpoint, which stays a plain student that ``kdctl eval`` and export read).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from kdctl.distill.class_map import TeacherClasses, dataset_classes, plan_teacher_classes, restrict_classes
from kdctl.distill.methods import build_distiller
from kdctl.artifact.checkpoint import load_checkpoint_weights, load_model_weights
from kdctl.artifact.stored import stored_detector_config
from kdctl.engine.transfer import build_with_weights
from kdctl.engine.parts import TrainParts
from kdctl.engine.trainer import Trainer
from kdctl.errors import KdctlError
from kdctl.models.detector import Detector, build_detector
from kdctl.recipe import DetectorConfig, Recipe, pair_problem
from kdctl.recipe.pairs import output_methods


def teacher_config(recipe: Recipe) -> tuple[DetectorConfig, str]:
    """(the teacher's detector section, the checkpoint holding its weights).

    ``model.teacher_checkpoint`` wins: its own stored recipe says what the teacher is. Otherwise
    ``model.teacher`` with its ``weights``."""
    m = recipe.model
    if m.teacher_checkpoint:
        _, meta = load_checkpoint_weights(m.teacher_checkpoint, tensors=False)
        cfg, _ = stored_detector_config(m.teacher_checkpoint, meta)
        return cfg, m.teacher_checkpoint
    if m.teacher is None:
        raise KdctlError("distill.losses needs a teacher: add model.teacher with weights, "
                         "or pass --teacher CHECKPOINT (e.g. a run's best.safetensors)")
    if not m.teacher.weights:
        raise KdctlError("model.teacher has no weights: train it first (kdctl train RECIPE --model teacher) and "
                         "pass --teacher RUN/best.safetensors, or set model.teacher.weights")
    return m.teacher.model_copy(update={"pretrained": None, "weights": None}), m.teacher.weights


class CheckedTeacher(NamedTuple):
    """What :func:`checked_teacher_config` settled: the teacher's detector section, the checkpoint
    holding its weights, and how its classes meet the dataset's."""

    cfg: DetectorConfig
    weights: str
    classes: TeacherClasses


def checked_teacher_config(recipe: Recipe, classes: Sequence[str] | None = None) -> CheckedTeacher:
    """:func:`teacher_config`, refused (one line naming the checkpoint) when the pair cannot run
    ``distill.losses`` (:func:`kdctl.recipe.pair_problem`) or, for a prediction method, when a
    dataset class has no teacher class (``distill.class_map``, :mod:`kdctl.distill.class_map`).

    ``classes``: the dataset's class names; None reads them from ``recipe.data`` (only when a
    prediction method needs them), so that the check runs before any run directory exists."""
    cfg, weights = teacher_config(recipe)
    problem = pair_problem(recipe.model.student, cfg, recipe.distill.losses)
    if problem:
        raise KdctlError(f"{weights}: {problem}")
    predicts = any(c.type in output_methods() for c in recipe.distill.losses)
    if predicts and classes is None:
        classes = dataset_classes(recipe.data)
    _, meta = load_checkpoint_weights(weights, tensors=False)
    plan = plan_teacher_classes(meta, cfg.num_classes, str(weights), predicts=predicts, student_classes=classes,
                                setting=recipe.distill.class_map)
    return CheckedTeacher(cfg, weights, plan)


def build_teacher(recipe: Recipe, classes: Sequence[str], checked: CheckedTeacher | None = None) -> Detector:
    """The frozen teacher of ``recipe`` with its weights, for a dataset of ``classes`` (names).

    Built with its own number of classes (its checkpoint's); for a prediction method whose
    teacher has other classes, its classification predictor keeps only the mapped classes in
    the dataset's order (:func:`~kdctl.distill.class_map.restrict_classes`). ``checked``: this
    recipe's :func:`checked_teacher_config`, when the caller has it."""
    cfg, weights, plan = checked or checked_teacher_config(recipe, classes)
    teacher = build_detector(cfg, plan.num_classes or len(classes))
    state, _ = load_checkpoint_weights(weights)
    load_model_weights(teacher, state, str(weights))
    if plan.index is not None:
        restrict_classes(teacher, plan.index)
    teacher.requires_grad_(False)
    return teacher.eval()


class DistillTrainer(Trainer):
    """:class:`Trainer` of ``recipe.model.student`` with ``recipe.distill.losses`` from the
    recipe's teacher. With no losses it trains the student alone (the baseline) and loads no
    teacher."""

    def __init__(self, recipe: Recipe, run_dir: Path, **kwargs):
        kwargs.pop("which", None)
        # the teacher, pair and class-map checks run in build_parts, before the run directory exists
        super().__init__(recipe, run_dir, which="student", **kwargs)

    def build_parts(self, classes: list[str]) -> TrainParts:
        """Student (with ``weights`` when set), frozen teacher, KD methods and the distiller, in
        that order (random initialisation draws in that order too)."""
        r = self.recipe
        student, init = build_with_weights(r.model.student, classes, transfer=not self.resuming)
        info = {"init": init} if init else {}
        teacher = None
        if r.distill.losses:
            checked = checked_teacher_config(r, classes)
            teacher = build_teacher(r, classes, checked)
            if checked.classes.index is not None:  # the teacher's classes differ: the plan shows the map
                info["class_map"] = checked.classes.info(classes)
        distiller = build_distiller(student, teacher, r.distill.losses,
                                    teacher_amp=teacher_dtype(r.distill.teacher_amp, self.device))
        compiled = student.compiled_parts()
        if teacher is not None:
            teacher.to(self.device)
            if r.train.channels_last:
                teacher.to(memory_format=torch.channels_last)
            compiled += teacher.compiled_parts()
        # the distiller holds student + adapters; the teacher is not a submodule (not in DDP)
        return TrainParts(model=student, step=distiller, extra=distiller.kd_modules(), compiled=compiled,
                          info=info)

    def _meta(self) -> dict[str, str]:
        meta = super()._meta()
        meta["distill"] = ",".join(c.type for c in self.recipe.distill.losses) or "none"
        return meta


def teacher_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``distill.teacher_amp`` -> the teacher's autocast dtype (float32: autocast off).

    "auto" is fp32, as the official CrossKD teacher runs, whatever ``train.amp`` the student
    uses. Measured (benchmarks/bench_teacher_precision.py, BENCHMARKS.md): a bf16 teacher moves
    the KD-QFL classification losses of crosskd and pred_mimic by 1.5e-2 relative on demo
    batches, above the 1e-2 this default allows, so bf16 ("bf16"; "fp16" on CUDA) is an opt-in
    for speed."""
    if setting == "fp16" and device.type != "cuda":
        raise KdctlError("distill.teacher_amp is 'fp16', which needs a CUDA device; use 'bf16', 'off' or 'auto'")
    return {"auto": torch.float32, "off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def default_distill_dir(recipe_name: str, recipe: Recipe) -> Path:
    """``{train.out_dir}/{recipe stem}-{methods joined by +, or "none"}``."""
    methods = "+".join(c.type for c in recipe.distill.losses) or "none"
    return Path(recipe.train.out_dir) / f"{Path(recipe_name).stem}-{methods}"
