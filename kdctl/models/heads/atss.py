"""ATSS head (Zhang et al., 2020) as MMDetection's ``ATSSHead``.

One square anchor per location (``octave_base_scale=8``, ratio 1), ``DeltaXYWH`` deltas scaled
by a learnable per-level ``Scale`` (no exp: mmdet "just follows atss"), and a centerness conv
on the **reg** tower (``atss_centerness(reg_feat)``). GroupNorm(32) towers.
"""
from __future__ import annotations

from typing import Literal

from kdctl.models.heads.base import DenseHead


class ATSSHead(DenseHead):
    """Outputs per level: ``cls`` ``[B, K, H, W]`` logits; ``reg`` ``[B, 4, H, W]`` deltas
    (float32); ``centerness`` ``[B, 1, H, W]`` logits (reg branch)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        norm: Literal["gn", "bn", "none"] = "gn",
        num_groups: int = 32,
        num_levels: int = 5,
        conv_bias: bool | None = None,
    ):
        super().__init__(
            num_classes, in_channels, feat_channels, stacked_convs,
            num_anchors=1, reg_channels=4, centerness_on="reg",
            num_levels=num_levels, use_scale=True, norm=norm, num_groups=num_groups,
            conv_bias=conv_bias,
        )
