"""``kdctl distill``: the training engine with a :class:`~kdctl.distill.distiller.Distiller`.

Everything about the loop, checkpoints, resume and evaluation is :class:`Trainer`'s; this
subclass only builds its parts (:meth:`DistillTrainer.build_parts`): the student, the teacher,
the KD methods and the :class:`Distiller` that computes the step's losses; the methods'
adapters are the training-only extra parts (optimised and in the resume state, not in the
student's checkpoint, which stays a plain student that ``kdctl eval`` and export read).
"""
from __future__ import annotations

from pathlib import Path

import torch

from kdctl.distill.methods import build_distiller
from kdctl.engine.checkpoint import build_with_weights, load_checkpoint_weights, load_model_weights
from kdctl.engine.inference import stored_detector_config
from kdctl.engine.trainer import Trainer, TrainParts
from kdctl.errors import KdctlError
from kdctl.models.detector import Detector, build_detector
from kdctl.recipe import DetectorConfig, Recipe, pair_problem


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


def checked_teacher_config(recipe: Recipe) -> tuple[DetectorConfig, str]:
    """:func:`teacher_config`, refused (one line naming the checkpoint) when the pair cannot run
    ``distill.losses`` (:func:`kdctl.recipe.pair_problem`)."""
    cfg, weights = teacher_config(recipe)
    problem = pair_problem(recipe.model.student, cfg, recipe.distill.losses)
    if problem:
        raise KdctlError(f"{weights}: {problem}")
    return cfg, weights


def build_teacher(recipe: Recipe, num_classes: int) -> Detector:
    """The frozen teacher of ``recipe`` with its weights, checked against the student."""
    cfg, weights = checked_teacher_config(recipe)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise KdctlError(f"{weights}: the teacher has {cfg.num_classes} classes but the dataset {num_classes}; "
                         "distil on the data the teacher was trained for")
    teacher = build_detector(cfg, num_classes)
    state, _ = load_checkpoint_weights(weights)
    load_model_weights(teacher, state, str(weights))
    teacher.requires_grad_(False)
    return teacher.eval()


class DistillTrainer(Trainer):
    """:class:`Trainer` of ``recipe.model.student`` with ``recipe.distill.losses`` from the
    recipe's teacher. With no losses it trains the student alone (the baseline) and loads no
    teacher."""

    def __init__(self, recipe: Recipe, run_dir: Path, **kwargs):
        kwargs.pop("which", None)
        if recipe.distill.losses:
            checked_teacher_config(recipe)  # before the run directory is created
        super().__init__(recipe, run_dir, which="student", **kwargs)

    def build_parts(self, classes: list[str]) -> TrainParts:
        """Student (with ``weights`` when set), frozen teacher, KD methods and the distiller, in
        that order (random initialisation draws in that order too)."""
        r = self.recipe
        student, init = build_with_weights(r.model.student, classes)
        teacher = build_teacher(r, len(classes)) if r.distill.losses else None
        distiller = build_distiller(student, teacher, r.distill.losses,
                                    teacher_amp=teacher_dtype(r.distill.teacher_amp, self.device))
        compiled = [student.backbone, student.neck]
        if teacher is not None:
            teacher.to(self.device)
            if r.train.channels_last:
                teacher.to(memory_format=torch.channels_last)
            compiled += [teacher.backbone, teacher.neck]
        # the distiller holds student + adapters; the teacher is not a submodule (not in DDP)
        return TrainParts(model=student, step=distiller, extra=distiller.kd_modules(), compiled=compiled,
                          info={"init": init} if init else {})

    def _meta(self) -> dict[str, str]:
        meta = super()._meta()
        meta["distill"] = ",".join(c.type for c in self.recipe.distill.losses) or "none"
        return meta


def teacher_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``distill.teacher_amp`` -> the teacher's autocast dtype (None: the step's own autocast,
    ``train.amp``; float32: autocast off). "auto": bf16 on a CUDA device that supports it,
    since the frozen teacher's forward is pure inference, else the step's own."""
    if setting == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if setting == "fp16" and device.type != "cuda":
        raise KdctlError("distill.teacher_amp is 'fp16', which needs a CUDA device; use 'bf16', 'off' or 'auto'")
    return {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def default_distill_dir(recipe_name: str, recipe: Recipe) -> Path:
    """``{train.out_dir}/{recipe stem}-{methods joined by +, or "none"}``."""
    methods = "+".join(c.type for c in recipe.distill.losses) or "none"
    return Path(recipe.train.out_dir) / f"{Path(recipe_name).stem}-{methods}"
