"""ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via
Adaptive Training Sample Selection", CVPR 2020) as MMDetection's ``ATSSHead``
(``configs/atss/atss_r50_fpn_1x_coco.py``).

One square anchor per location (octave base 8, ratio 1), ATSS assignment (top 9 per level),
focal loss; ``DeltaXYWH`` deltas (stds 0.1/0.2) scaled by a per-level ``Scale`` (no exp: mmdet
"just follows atss"); GIoU on decoded boxes weighted by the centerness target and averaged by
its sum; centerness BCE (a conv on the **reg** tower) averaged by #pos. GroupNorm(32) towers,
P6 from P5. NMS IoU 0.6; the score is cls x centerness. CrossKD
(``crosskd_r50_atss_r18_fpn_1x_coco``): reuse_idx 3, KD-QFL 1.0 + GIoU 1.0 + centerness 1.0.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kdctl.models.assigners import ATSSAssigner
from kdctl.models.coders import ATSS_STDS, DeltaXYWHCoder
from kdctl.models.decoders import DeltaDecoder
from kdctl.models.families.family import (
    DetectionLoss, Family, PredictionKD, centerness_score, centerness_targets, padded_targets,
)
from kdctl.models.head import DenseHead
from kdctl.models.losses import focal_loss, giou_loss, weighted_mean


class ATSSHead(DenseHead):
    """Outputs per level: ``cls`` ``[B, K, H, W]`` logits; ``reg`` ``[B, 4, H, W]`` deltas
    (float32); ``centerness`` ``[B, 1, H, W]`` logits (reg branch)."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 norm: Literal["gn", "bn", "none"] = "gn", num_groups: int = 32, num_levels: int = 5,
                 conv_bias: bool | None = None):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_anchors=1, reg_channels=4,
                         centerness_on="reg", num_levels=num_levels, use_scale=True, norm=norm, num_groups=num_groups,
                         conv_bias=conv_bias)


class ATSSLoss(DetectionLoss):
    """Focal loss by #pos; GIoU weighted by the centerness target, by its sum; centerness BCE by #pos."""

    def __call__(self, flat, priors, assignment, reduce=lambda t: t):
        a = assignment
        num_pos = self.num_pos(a, reduce)
        cls = focal_loss(flat["cls"].float(), a.labels)
        # mmdet atss_head.centerness_target: from the anchor centre to the GT's sides
        target = padded_targets(a, priors)
        ctr_t = centerness_targets(a, priors, target)
        box = torch.where(a.pos_mask, giou_loss(self.decoder.decode(flat["reg"].float(), priors), target), 0.0)
        ctr = F.binary_cross_entropy_with_logits(flat["centerness"].float().squeeze(-1), ctr_t, reduction="none")
        ctr = torch.where(a.pos_mask, ctr, 0.0)
        return self.weighted({
            "loss_cls": weighted_mean(cls, avg_factor=num_pos),
            "loss_bbox": weighted_mean(box, ctr_t, avg_factor=reduce(ctr_t.sum()), min_factor=1.0),
            "loss_centerness": weighted_mean(ctr, avg_factor=num_pos),
        })


def _head(cfg, num_classes, in_channels, num_levels, norm) -> ATSSHead:
    return ATSSHead(num_classes, in_channels, cfg.feat_channels, cfg.stacked_convs, norm=norm, num_levels=num_levels,
                    conv_bias=cfg.variant.head_conv_bias)


FAMILY = Family(
    name="atss",
    summary="ATSS: 1 anchor, adaptive sample selection, focal loss, centerness-weighted GIoU",
    head=ATSSHead,
    norm="gn",
    fpn_extra=("p5", False),
    anchors=(8.0, 1, (1.0,)),
    point_offset=0.0,
    nms_iou=0.6,
    loss_weights={"loss_cls": 1.0, "loss_bbox": 2.0, "loss_centerness": 1.0},
    box_losses=("giou",),
    assigner="atss",
    reuse_idx=3,
    kd=PredictionKD(cls_weight=1.0, reg_weight=1.0, reg_loss="giou", ctr_weight=1.0),
    mmdet_predictors=(("atss_cls",), ("atss_reg",), ("atss_centerness",)),
    build_head=_head,
    build_assigner=lambda cfg, decoder: ATSSAssigner(topk=9, ignore_iof_thr=cfg.ignore_iof_thr),
    build_decoder=lambda cfg, head: DeltaDecoder(DeltaXYWHCoder(stds=ATSS_STDS), FAMILY.nms_iou, centerness_score(cfg)),
    build_loss=lambda cfg, num_classes, decoder: ATSSLoss(num_classes, FAMILY.loss_weights, decoder, "giou"),
)
