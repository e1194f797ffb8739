"""FPN feature distillation: SSIM (de Rijk et al., NeurIPS 2022) and the baselines PKD, L2, L1.

Every loss here compares the student's FPN level ``l`` with the teacher's level ``l`` (P3-P7,
all five levels, as CrossKD's ``crosskd+pkd`` configs do), sums over levels and multiplies by
the method's weight. An optional adapter per level (a 1x1 conv, student width -> teacher width,
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

import torch.nn.functional as F
from torch import Tensor, nn

from kdctl.distill.methods import KDInputs, KDMethod
from kdctl.distill.ssim import ssim_feature_loss


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
        student_channels, teacher_channels: the two necks' widths; num_levels: levels compared.
        adapter: True / False / "auto" (a 1x1 conv per level only where the widths differ).
        ssim: keyword arguments of :func:`ssim_feature_loss` (``window_size``, ``sigma``,
            ``alpha``, ``beta``, ``gamma``) for ``kind == "ssim"``.
    """

    reads = frozenset({"neck"})

    def __init__(self, kind: str, weight: float, student_channels: int, teacher_channels: int, num_levels: int,
                 adapter: bool | str = "auto", ssim: dict | None = None):
        super().__init__()
        if kind != "ssim" and kind not in LEVEL_LOSSES:
            raise ValueError(f"unknown feature KD kind {kind!r}")
        self.name = self.kind = kind
        self.weight = weight
        self.ssim = dict(ssim or {})
        use = student_channels != teacher_channels if adapter == "auto" else bool(adapter)
        self.adapters = (nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels))
                         if use else None)

    def level_loss(self, s: Tensor, t: Tensor) -> Tensor:
        if self.kind == "ssim":
            return ssim_feature_loss(s.float(), t.detach().float(), **self.ssim)
        return LEVEL_LOSSES[self.kind](s, t)

    def forward(self, inputs: KDInputs) -> dict[str, Tensor]:
        return self.feature_loss(inputs.s_feats, inputs.t_feats)

    def feature_loss(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> dict[str, Tensor]:
        """``{"loss_<kind>": weight * sum over levels}`` of the two necks' levels (finest first)."""
        total = None
        for level, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            if self.adapters is not None:
                s = self.adapters[level](s)
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            value = self.level_loss(s, t)
            total = value if total is None else total + value
        return {f"loss_{self.kind}": self.weight * total}
