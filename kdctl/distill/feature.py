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


class FeatureKD(nn.Module):
    """One feature method over the FPN levels. ``cfg``: its recipe entry (``SSIMLoss`` or
    ``FeatureLoss``); ``student_channels`` / ``teacher_channels``: the two FPN widths."""

    def __init__(self, cfg, student_channels: int, teacher_channels: int, num_levels: int):
        super().__init__()
        self.kind = cfg.type
        self.weight = cfg.weight
        self.cfg = cfg
        use = student_channels != teacher_channels if cfg.adapter == "auto" else bool(cfg.adapter)
        self.adapters = (nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels))
                         if use else None)

    def level_loss(self, s: Tensor, t: Tensor) -> Tensor:
        if self.kind == "pkd":
            return pkd_loss(s, t)
        if self.kind == "feat_l2":
            return l2_loss(s, t)
        if self.kind == "feat_l1":
            return l1_loss(s, t)
        c = self.cfg
        return ssim_feature_loss(s.float(), t.detach().float(), window_size=c.window, sigma=c.sigma, alpha=c.alpha,
                                 beta=c.beta, gamma=c.gamma)

    def forward(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> dict[str, Tensor]:
        total = None
        for level, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            if self.adapters is not None:
                s = self.adapters[level](s)
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            value = self.level_loss(s, t)
            total = value if total is None else total + value
        return {f"loss_{self.kind}": self.weight * total}
