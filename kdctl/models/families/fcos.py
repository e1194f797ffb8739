"""FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019) as
MMDetection's ``FCOSHead``.

Anchor-free: one point per location at the cell centre (offset 0.5). Defaults follow mmdet's
standard R50 1x config (``configs/fcos/fcos_r50_caffe_fpn_gn-head_1x_coco.py``), which leaves
``norm_on_bbox`` and ``centerness_on_reg`` False: distances are ``exp(scale * x)`` in pixels and
centerness is predicted from the **cls** tower. The "tricks" configs
(``..._gn-head-center-normbbox-centeronreg-giou_1x_coco.py``) set both (``variant.fcos_*``):
distances are then ``relu(scale * x)`` in strides, and centerness sits on the reg tower. Unlike
mmdet, the head never multiplies by the stride in eval mode (its output does not depend on
``.training``); the decoder multiplies normalised distances by the stride.

Targets: centre sampling (radius 1.5) and per-level scale ranges; focal loss by #pos, IoU (-log)
or GIoU loss on decoded boxes weighted by the centerness target and averaged by its sum,
centerness BCE by #pos. GroupNorm(32) towers; P6 from P5 with a ReLU before P7. NMS IoU 0.5; the
score is cls x centerness. CrossKD (``crosskd_r50_fcos_r18_fpn_1x_coco``): reuse_idx 2, KD-QFL
0.4 + IoU 0.75 over every point, normalised by the positives' centerness-target sum.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdctl.models.assigners import FCOSAssigner
from kdctl.models.decoders import DistanceDecoder
from kdctl.models.families.family import (
    DetectionLoss, Family, PredictionKD, centerness_score, centerness_targets, padded_targets,
)
from kdctl.models.head import DenseHead
from kdctl.models.losses import focal_loss, giou_loss, iou_loss, weighted_mean
from kdctl.models.priors import FCOS_POINT_OFFSET


class FCOSHead(DenseHead):
    """Outputs per level: ``cls`` ``[B, K, H, W]`` logits; ``reg`` ``[B, 4, H, W]`` (left, top,
    right, bottom) distances >= 0, float32 (pixels, or strides when ``norm_on_bbox``);
    ``centerness`` ``[B, 1, H, W]`` logits, returned by the branch in ``centerness_on``."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 norm: Literal["gn", "bn", "none"] = "gn", num_groups: int = 32, num_levels: int = 5,
                 norm_on_bbox: bool = False, centerness_on_reg: bool = False, conv_bias: bool | None = None):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_anchors=1, reg_channels=4,
                         centerness_on="reg" if centerness_on_reg else "cls", num_levels=num_levels, use_scale=True,
                         norm=norm, num_groups=num_groups, conv_bias=conv_bias)
        self.norm_on_bbox = norm_on_bbox

    def activate_reg(self, reg: Tensor) -> Tensor:
        return F.relu(reg) if self.norm_on_bbox else reg.exp()


class FCOSLoss(DetectionLoss):
    """Focal loss by #pos; IoU or GIoU weighted by the centerness target, by its sum (mmdet
    ``centerness_denorm = max(reduce_mean(sum of targets), 1e-6)``); centerness BCE by #pos."""

    def __call__(self, flat, priors, assignment, reduce=lambda t: t):
        a = assignment
        num_pos = self.num_pos(a, reduce)
        pos = a.pos_mask
        cls = focal_loss(flat["cls"].float(), a.labels)
        target = padded_targets(a, priors)
        ctr_t = centerness_targets(a, priors, target)
        pred_box = self.decoder.decode(flat["reg"].float(), priors)
        box = giou_loss(pred_box, target) if self.box_loss == "giou" else iou_loss(pred_box, target)
        box = torch.where(pos, box, 0.0)
        ctr = F.binary_cross_entropy_with_logits(flat["centerness"].float().squeeze(-1), ctr_t, reduction="none")
        ctr = torch.where(pos, ctr, 0.0)
        return self.weighted({
            "loss_cls": weighted_mean(cls, avg_factor=num_pos),
            "loss_bbox": weighted_mean(box, ctr_t, avg_factor=reduce(ctr_t.sum()), min_factor=1e-6),
            "loss_centerness": weighted_mean(ctr, avg_factor=num_pos),
        })


def _head(cfg, num_classes, in_channels, num_levels, norm) -> FCOSHead:
    v = cfg.variant
    return FCOSHead(num_classes, in_channels, cfg.feat_channels, cfg.stacked_convs, norm=norm, num_levels=num_levels,
                    norm_on_bbox=v.fcos_norm_on_bbox, centerness_on_reg=v.fcos_centerness_on_reg,
                    conv_bias=v.head_conv_bias)


def _loss(cfg, num_classes, decoder) -> FCOSLoss:
    box = FAMILY.box_losses[0] if cfg.box_loss == "auto" else cfg.box_loss
    return FCOSLoss(num_classes, FAMILY.loss_weights, decoder, box)


FAMILY = Family(
    name="fcos",
    summary="FCOS: anchor-free points, centre sampling, focal loss, IoU loss, centerness",
    head=FCOSHead,
    norm="gn",
    fpn_extra=("p5", True),
    anchors=None,
    point_offset=FCOS_POINT_OFFSET,
    nms_iou=0.5,
    loss_weights={"loss_cls": 1.0, "loss_bbox": 1.0, "loss_centerness": 1.0},
    box_losses=("iou", "giou"),
    assigner="fcos",
    reuse_idx=2,
    kd=PredictionKD(cls_weight=0.4, reg_weight=0.75, reg_loss="iou", mask_invalid=False, norm="centerness"),
    mmdet_predictors=(("conv_cls", "fcos_cls"), ("conv_reg", "fcos_reg"), ("conv_centerness", "fcos_centerness")),
    build_head=_head,
    build_assigner=lambda cfg, decoder: FCOSAssigner(center_sampling=cfg.center_sampling is not False, center_sample_radius=1.5,
                                                      ignore_iof_thr=cfg.ignore_iof_thr),
    build_decoder=lambda cfg, head: DistanceDecoder(FAMILY.nms_iou, centerness_score(cfg), norm_on_bbox=head.norm_on_bbox),
    build_loss=_loss,
)
