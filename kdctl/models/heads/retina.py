"""RetinaNet head (Lin et al., 2017) as MMDetection's ``RetinaHead``.

9 anchors per location (3 octave scales x 3 aspect ratios), sigmoid classification and
``DeltaXYWH`` box deltas. No per-level ``Scale`` and, in mmdet, no norm in the towers
(``norm_cfg=None``: convs with bias), hence ``norm="none"`` by default here.
"""
from __future__ import annotations

from typing import Literal

from kdctl.models.heads.base import DenseHead


class RetinaHead(DenseHead):
    """Outputs per level: ``cls`` ``[B, A*K, H, W]`` logits, ``reg`` ``[B, A*4, H, W]`` deltas
    (dx, dy, dw, dh per anchor, anchor-major: channel ``a*4 + j``)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_anchors: int = 9,
        norm: Literal["gn", "bn", "none"] = "none",
        num_groups: int = 32,
        num_levels: int = 5,
        conv_bias: bool | None = None,
    ):
        super().__init__(
            num_classes, in_channels, feat_channels, stacked_convs,
            num_anchors=num_anchors, reg_channels=4, centerness_on=None,
            num_levels=num_levels, use_scale=False, norm=norm, num_groups=num_groups,
            conv_bias=conv_bias,
        )
