"""The KD-method interface and the one builder that reads ``distill.losses``.

A KD method is a small ``nn.Module`` (it may hold learnable adapters) that declares what it
reads of a step and returns named losses:

- ``reads``: a subset of ``{"neck", "head", "tower"}`` — the neck levels of both detectors, the
  head outputs of both, the pre-activation tower features at ``tower_idx`` of both;
- ``forward(inputs: KDInputs) -> {"loss_<name>...": Tensor}``.

:class:`~kdctl.distill.distiller.Distiller` runs the teacher only as far as the methods read,
then loops over them. Adding a method: a recipe section class (its ``type`` literal is its name:
the names exist only there, :data:`kdctl.recipe.METHOD_NAMES`), a module with the method, and
one entry in :func:`build_kd_methods` (docs/architecture.md, "Adding a KD method").
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from kdctl.models.assigners import Assignment
from kdctl.models.priors import Priors

Reduce = Callable[[Tensor], Tensor]
READS = ("neck", "head", "tower")


@dataclass
class KDInputs:
    """What one training step hands the KD methods (student ``s_*``, teacher ``t_*``).

    s_feats, t_feats   neck levels ``[B, C, H_l, W_l]``, finest first
    s_out, t_out       raw per-level head outputs (``t_out`` None unless a method reads "head")
    t_flat             the teacher's, flattened (``Detector.flat_outputs``: ``{"cls": [B, N, K], ...}``);
                       a method flattens ``s_out`` itself (its own graph node, so gradients
                       accumulate per loss as they always have: bit-identical runs)
    s_mid, t_mid       ``{"cls": [per level], "reg": [...]}`` pre-activation tower features at
                       the methods' ``tower_idx`` (None unless a method reads "tower")
    priors, assignment the student's priors and its assignment of this batch (shared with the
                       detection losses)
    reduce             the all-reduce mean of averaging factors (identity on one process)
    student, teacher   the two detectors (their heads, decoders, ``flat_outputs``)
    """

    student: nn.Module
    teacher: nn.Module
    s_feats: list[Tensor]
    t_feats: list[Tensor]
    s_out: dict[str, list[Tensor]]
    t_out: dict[str, list[Tensor]] | None
    t_flat: dict[str, Tensor] | None
    s_mid: dict[str, list[Tensor]] | None
    t_mid: dict[str, list[Tensor]] | None
    priors: Priors
    assignment: Assignment
    reduce: Reduce


class KDMethod(nn.Module):
    """Base of the KD methods. Subclasses set ``name`` (the recipe's ``type``), ``reads`` and,
    when they read "tower", ``tower_idx``; ``forward(inputs)`` returns named losses."""

    name: str = ""
    reads: frozenset[str] = frozenset()
    tower_idx: int = 0

    def forward(self, inputs: KDInputs) -> dict[str, Tensor]:
        raise NotImplementedError


def build_kd_methods(losses: list, student, teacher) -> list[KDMethod]:
    """The methods of ``distill.losses`` for this student/teacher pair, in recipe order (the pair
    is already checked by :func:`kdctl.recipe.pair_problem`). The one place that reads the
    recipe's KD sections; the methods take plain arguments."""
    from kdctl.distill.crosskd import CrossKD
    from kdctl.distill.feature import FeatureKD, shared_levels
    from kdctl.distill.prediction import PredictionMimic
    from kdctl.recipe import CrossKDLoss, FeatureLoss, MimicLoss, SSIMLoss

    methods: list[KDMethod] = []
    family = student.family
    for c in losses:
        if isinstance(c, CrossKDLoss):
            # between two families (recipe_pairs.crosses_families) the losses live in the teacher's output space
            across = teacher.family.name != family.name
            space = teacher if across else student
            methods.append(CrossKD(student.head, teacher.head, space.family.kd, space.decoder,
                                   family.reuse_idx if c.reuse_idx is None else c.reuse_idx, c.adapter,
                                   weight=c.weight, cls_weight=c.cls_weight, reg_weight=c.reg_weight,
                                   temperature=c.temperature, beta=c.beta, across=across))
        elif isinstance(c, MimicLoss):
            methods.append(PredictionMimic(family.kd, student.decoder, weight=c.weight, cls_weight=c.cls_weight,
                                           reg_weight=c.reg_weight, temperature=c.temperature, beta=c.beta))
        elif isinstance(c, SSIMLoss):
            methods.append(FeatureKD("ssim", c.weight, student.neck.out_channels, teacher.neck.out_channels,
                                     student.neck.num_outs, c.adapter, ssim={"window_size": c.window, "sigma": c.sigma,
                                                                             "alpha": c.alpha, "beta": c.beta,
                                                                             "gamma": c.gamma},
                                     pairs=shared_levels(student.neck.strides, teacher.neck.strides)))
        elif isinstance(c, FeatureLoss):
            methods.append(FeatureKD(c.type, c.weight, student.neck.out_channels, teacher.neck.out_channels,
                                     student.neck.num_outs, c.adapter,
                                     pairs=shared_levels(student.neck.strides, teacher.neck.strides)))
        else:  # a recipe section without a builder: a programming error, caught by the tests
            raise TypeError(f"no KD method is built for {type(c).__name__}")
    return methods


def build_distiller(student, teacher, losses: list, *, teacher_amp=None):
    """A :class:`~kdctl.distill.distiller.Distiller` of ``student`` and ``teacher`` with the
    methods of ``distill.losses`` (:func:`build_kd_methods`)."""
    from kdctl.distill.distiller import Distiller

    return Distiller(student, teacher, build_kd_methods(losses, student, teacher), teacher_amp=teacher_amp)
