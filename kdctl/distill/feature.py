"""FPN feature distillation: SSIM (de Rijk et al., NeurIPS 2022) and the baselines PKD, L2, L1.

Every loss here compares the student's neck level with the teacher's level of the same stride
(P3-P7, all five levels, as CrossKD's ``crosskd+pkd`` configs do, when both necks have them;
the shared levels only when one neck has fewer, e.g. a P3-P5 yolo student and a P3-P7 teacher:
:func:`shared_levels`, with a one-time warning naming the levels left out), sums over levels and
multiplies by the method's weight. An optional adapter per level (a 1x1 conv, student width -> teacher width,
training only) maps the student first; with ``adapter: auto`` it exists only when the widths
differ. A student level whose size differs from the teacher's is resized bilinearly to it
(MMRazor's ``PKDLoss(resize_stu=True)``).

- ``pkd``: Pearson-correlation KD (Cao et al., "PKD: General Distillation Framework for Object
  Detectors via Pearson Correlation Coefficient", NeurIPS 2022; MMRazor ``PKDLoss``): each
  channel standardised over (N, H, W) (unbiased std + 1e-6), then ``MSE / 2``.
- ``feat_l2`` / ``feat_l1``: mean squared / absolute error of the raw (adapted) features
  (FitNets-style imitation, Romero et al., ICLR 2015).
- ``ssim``: ``mean((1 - SSIM) / 2)`` after per-sample, per-channel min-max normalisation; see
  :mod:`kdctl.distill.ssim`.
"""
from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch import Tensor, nn

from kdctl.distill.kd import KDInputs, KDMethod
from kdctl.distill.ssim import ssim_feature_loss
from kdctl.errors import KdctlError
from kdctl.models.contract import NECK
from kdctl.models.necks import level_widths


def shared_levels(student_strides: list[int], teacher_strides: list[int]) -> list[tuple[int, int]]:
    """``(student level, teacher level)`` index pairs of the strides both necks have, finest
    first; KdctlError when they share none."""
    pairs = [(i, teacher_strides.index(s)) for i, s in enumerate(student_strides) if s in teacher_strides]
    if not pairs:
        raise KdctlError(f"feature distillation: the student's neck levels (strides {list(student_strides)}) and the "
                         f"teacher's ({list(teacher_strides)}) share no stride; pick a teacher whose neck has one "
                         "of them")
    return pairs


def standardize_channels(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Each channel of ``[B, C, H, W]`` to zero mean, unit (unbiased) std over (B, H, W)."""
    flat = x.transpose(0, 1).flatten(1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + eps)
    return flat.view(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)


def pkd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """PKD of one level: ``mean((z(s) - z(t))^2) / 2`` with per-channel standardisation ``z``."""
    return F.mse_loss(standardize_channels(student.float()), standardize_channels(teacher.detach().float())) / 2


def l2_loss(student: Tensor, teacher: Tensor) -> Tensor:
    return F.mse_loss(student.float(), teacher.detach().float())


def l1_loss(student: Tensor, teacher: Tensor) -> Tensor:
    return F.l1_loss(student.float(), teacher.detach().float())


LEVEL_LOSSES = {"pkd": pkd_loss, "feat_l2": l2_loss, "feat_l1": l1_loss}


class FeatureKD(KDMethod):
    """One feature method over the neck levels (reads "neck"); loss ``loss_<kind>``.

    Args:
        kind: "ssim", "pkd", "feat_l2" or "feat_l1".
        weight: multiplies the sum over levels.
        student_channels, teacher_channels: the two necks' widths (``neck.out_channels``: one, or
            one per level); num_levels: the student's levels.
        adapter: True / False / "auto" (a 1x1 conv per compared level, only when some widths differ).
        pairs: the (student, teacher) level indices compared (:func:`shared_levels`); None: level
            by level.
        ssim: keyword arguments of :func:`ssim_feature_loss` (``window_size``, ``sigma``,
            ``alpha``, ``beta``, ``gamma``) for ``kind == "ssim"``.
    """

    reads = frozenset({"neck"})
    needs = frozenset({NECK})

    def __init__(self, kind: str, weight: float, student_channels: int | list[int], teacher_channels: int | list[int],
                 num_levels: int, adapter: bool | str = "auto", ssim: dict | None = None,
                 pairs: list[tuple[int, int]] | None = None):
        super().__init__()
        if kind != "ssim" and kind not in LEVEL_LOSSES:
            raise ValueError(f"unknown feature KD kind {kind!r}")
        self.name = self.kind = kind
        self.weight = weight
        self.ssim = dict(ssim or {})
        s_w = level_widths(student_channels, num_levels)
        t_w = level_widths(teacher_channels, num_levels)
        pairs = [(i, i) for i in range(min(len(s_w), len(t_w)))] if pairs is None else pairs
        use = any(s_w[i] != t_w[j] for i, j in pairs) if adapter == "auto" else bool(adapter)
        # one adapter per compared student level, keyed by its index (the resume state's names)
        self.adapters = nn.ModuleDict({str(i): nn.Conv2d(s_w[i], t_w[j], 1) for i, j in pairs}) if use else None
        self._warned = False

    def level_loss(self, s: Tensor, t: Tensor) -> Tensor:
        if self.kind == "ssim":
            return ssim_feature_loss(s.float(), t.detach().float(), **self.ssim)
        return LEVEL_LOSSES[self.kind](s, t)

    def forward(self, inputs: KDInputs) -> dict[str, Tensor]:
        s_strides, t_strides = list(inputs.student.strides), list(inputs.teacher.strides)
        pairs = shared_levels(s_strides, t_strides)
        if len(pairs) < max(len(s_strides), len(t_strides)) and not self._warned:
            self._warned = True
            left = sorted((set(s_strides) | set(t_strides)) - set(s_strides[i] for i, _ in pairs))
            warnings.warn(f"{self.kind}: compares the neck levels both detectors have (strides "
                          f"{[s_strides[i] for i, _ in pairs]}); strides {left} exist on one side only and are "
                          "not compared", stacklevel=2)
        return self.feature_loss(inputs.s_feats, inputs.t_feats, pairs)

    def feature_loss(self, student_feats: list[Tensor], teacher_feats: list[Tensor],
                     pairs: list[tuple[int, int]] | None = None) -> dict[str, Tensor]:
        """``{"loss_<kind>": weight * sum over levels}`` of the two necks' levels: ``pairs`` of
        (student, teacher) level indices (:func:`shared_levels`), or level by level (finest first)."""
        if pairs is None:
            pairs = list(zip(range(len(student_feats)), range(len(teacher_feats))))
        total = None
        for level, t_level in pairs:
            s, t = student_feats[level], teacher_feats[t_level]
            if self.adapters is not None:
                s = self.adapters[str(level)](s)
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            value = self.level_loss(s, t)
            total = value if total is None else total + value
        return {f"loss_{self.kind}": self.weight * total}
