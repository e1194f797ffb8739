"""The one builder that reads ``distill.losses``: the KD methods of a recipe
(:func:`build_kd_methods`) and the :class:`~kdctl.distill.distiller.Distiller` that runs them
(:func:`build_distiller`). The method interface is :mod:`kdctl.distill.kd`."""
from __future__ import annotations

from kdctl.distill.crosskd import CrossKD
from kdctl.distill.distiller import Distiller
from kdctl.distill.feature import FeatureKD, shared_levels
from kdctl.distill.kd import KDMethod
from kdctl.distill.prediction import PredictionMimic
from kdctl.recipe import CrossKDLoss, FeatureLoss, MimicLoss, SSIMLoss


def build_kd_methods(losses: list, student, teacher) -> list[KDMethod]:
    """The methods of ``distill.losses`` for this student/teacher pair, in recipe order (the pair
    is already checked by :func:`kdctl.recipe.pair_problem`). The one place that reads the
    recipe's KD sections; the methods take plain arguments."""
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
    return Distiller(student, teacher, build_kd_methods(losses, student, teacher), teacher_amp=teacher_amp)
