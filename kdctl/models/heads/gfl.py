"""Generalized Focal Loss head (Li et al., 2020) as MMDetection's ``GFLHead``.

One square anchor per location; the cls output is the joint class-quality (IoU) score trained
with QFL; the box is a discrete distribution over ``0..reg_max`` (in strides) for each of the
four sides, trained with DFL. The distribution logits are scaled by a per-level ``Scale``
(``scale(gfl_reg(reg_feat))``). No centerness. GroupNorm(32) towers.
"""
from __future__ import annotations

from typing import Literal

from kdctl.models.heads.base import DenseHead


class GFLHead(DenseHead):
    """Outputs per level: ``cls`` ``[B, K, H, W]`` logits; ``reg`` ``[B, 4*(reg_max+1), H, W]``
    distribution logits (float32), side-major: channels ``s*(reg_max+1) .. (s+1)*(reg_max+1)-1``
    are side ``s`` in (left, top, right, bottom)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        norm: Literal["gn", "bn", "none"] = "gn",
        num_groups: int = 32,
        num_levels: int = 5,
        reg_max: int = 16,
        conv_bias: bool | None = None,
    ):
        super().__init__(
            num_classes, in_channels, feat_channels, stacked_convs,
            num_anchors=1, reg_channels=4 * (reg_max + 1), centerness_on=None,
            num_levels=num_levels, use_scale=True, norm=norm, num_groups=num_groups,
            conv_bias=conv_bias,
        )
        self.reg_max = reg_max
