"""FCOS head (Tian et al., 2019) as MMDetection's ``FCOSHead``.

Anchor-free: one point per location (A = 1). Defaults follow mmdet's standard R50 1x config
(``configs/fcos/fcos_r50_caffe_fpn_gn-head_1x_coco.py``), which leaves ``norm_on_bbox`` and
``centerness_on_reg`` at their ``False`` defaults: distances are ``exp(scale * x)`` in pixels
and centerness is predicted from the **cls** tower. The "tricks" configs
(``..._gn-head-center-normbbox-centeronreg-giou_1x_coco.py``) set both to True: distances are
then ``relu(scale * x)`` in units of the level's stride, and centerness sits on the reg tower.
Unlike mmdet, this head never multiplies by the stride in eval mode: its output does not depend
on ``.training``; the decoder multiplies normalised distances by the stride.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from kdctl.models.heads.base import DenseHead


class FCOSHead(DenseHead):
    """Outputs per level: ``cls`` ``[B, K, H, W]`` logits; ``reg`` ``[B, 4, H, W]`` (left, top,
    right, bottom) distances >= 0, float32 (pixels, or strides when ``norm_on_bbox``);
    ``centerness`` ``[B, 1, H, W]`` logits, returned by the branch in ``centerness_on``."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        norm: Literal["gn", "bn", "none"] = "gn",
        num_groups: int = 32,
        num_levels: int = 5,
        norm_on_bbox: bool = False,
        centerness_on_reg: bool = False,
        conv_bias: bool | None = None,
    ):
        super().__init__(
            num_classes, in_channels, feat_channels, stacked_convs,
            num_anchors=1, reg_channels=4, centerness_on="reg" if centerness_on_reg else "cls",
            num_levels=num_levels, use_scale=True, norm=norm, num_groups=num_groups,
            conv_bias=conv_bias,
        )
        self.norm_on_bbox = norm_on_bbox

    def activate_reg(self, reg: Tensor) -> Tensor:
        return F.relu(reg) if self.norm_on_bbox else reg.exp()
