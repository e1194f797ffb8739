"""Generalized Focal Loss (Li et al., "Generalized Focal Loss: Learning Qualified and
Distributed Bounding Boxes for Dense Object Detection", NeurIPS 2020) as MMDetection's
``GFLHead`` (``configs/gfl/gfl_r50_fpn_1x_coco.py``).

One square anchor per location (octave base 8) assigned by ATSS (top 9); the cls output is the
joint class-quality (IoU) score trained with QFL (beta 2) against the IoU of the detached decoded
box; the box is a discrete distribution over ``0..reg_max`` (16) strides per side from the anchor
centre (``integral``), scaled by a per-level ``Scale``, trained with GIoU (2.0) and DFL (0.25),
both weighted by the prior's max predicted score and averaged by its sum (DFL also / 4, mmdet
``avg_factor=4.0``). GroupNorm(32) towers, P6 from P5, NMS IoU 0.6. CrossKD
(``crosskd_r50_gflv1_r18_fpn_1x_coco``): reuse_idx 3, KD-QFL 1.0 + distribution KL 4.0.
"""
from __future__ import annotations

from typing import Literal

import torch

from kdctl.models.assigners import ATSSAssigner
from kdctl.models.coders import bbox2distance
from kdctl.models.decoders import DistributionDecoder
from kdctl.models.families.family import DetectionLoss, Family, PredictionKD, padded_targets
from kdctl.models.head import DenseHead
from kdctl.models.losses import aligned_iou, distribution_focal_loss, giou_loss, quality_focal_loss, weighted_mean


class GFLHead(DenseHead):
    """Outputs per level: ``cls`` ``[B, K, H, W]`` logits; ``reg`` ``[B, 4*(reg_max+1), H, W]``
    distribution logits (float32), side-major: channels ``s*(reg_max+1) .. (s+1)*(reg_max+1)-1``
    are side ``s`` in (left, top, right, bottom)."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 norm: Literal["gn", "bn", "none"] = "gn", num_groups: int = 32, num_levels: int = 5,
                 reg_max: int = 16, conv_bias: bool | None = None):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_anchors=1,
                         reg_channels=4 * (reg_max + 1), centerness_on=None, num_levels=num_levels, use_scale=True,
                         norm=norm, num_groups=num_groups, conv_bias=conv_bias)
        self.reg_max = reg_max


class GFLLoss(DetectionLoss):
    """QFL by #pos; GIoU and DFL weighted by the max predicted class score (detached), by its sum."""

    quality_target = True

    def cls_targets(self, assignment, pred_boxes=None):
        """QFL's soft target: at positives, IoU(``pred_boxes``, assigned GT) on the assigned class
        (the ``score`` of the loss, whose ``pred_boxes`` are its own detached decoded boxes);
        0 elsewhere. Without ``pred_boxes``, the one-hot of a perfect box (IoU 1)."""
        onehot = super().cls_targets(assignment)
        if pred_boxes is None:
            return onehot
        iou = torch.where(assignment.pos_mask, aligned_iou(pred_boxes.float(), assignment.boxes), 0.0)
        return onehot * iou[..., None]

    def __call__(self, flat, priors, assignment, reduce=lambda t: t):
        a = assignment
        reg_max = self.decoder.reg_max
        num_pos = self.num_pos(a, reduce)
        cls_logits, reg = flat["cls"].float(), flat["reg"].float()
        pos = a.pos_mask
        target = padded_targets(a, priors)
        pred_box = self.decoder.decode(reg, priors)
        score = torch.where(pos, aligned_iou(pred_box.detach(), target), 0.0)
        cls = quality_focal_loss(cls_logits, a.labels, score)
        weight = torch.where(pos, cls_logits.detach().sigmoid().amax(dim=-1), 0.0)  # [B, N]
        avg = reduce(weight.sum())
        box = torch.where(pos, giou_loss(pred_box, target), 0.0)
        stride = priors.stride[None, :, None]
        corners = bbox2distance(priors.points[None] / stride, target / stride, max_dist=reg_max)
        dfl = distribution_focal_loss(reg.unflatten(-1, (4, reg_max + 1)), corners)  # [B, N, 4]
        dfl = torch.where(pos[..., None], dfl, 0.0)
        return self.weighted({
            "loss_cls": weighted_mean(cls, avg_factor=num_pos),
            "loss_bbox": weighted_mean(box, weight, avg_factor=avg),
            "loss_dfl": weighted_mean(dfl, weight, avg_factor=avg) / 4.0,
        })


def _head(cfg, num_classes, in_channels, num_levels, norm) -> GFLHead:
    return GFLHead(num_classes, in_channels, cfg.feat_channels, cfg.stacked_convs, norm=norm, num_levels=num_levels,
                   conv_bias=cfg.variant.head_conv_bias)


FAMILY = Family(
    name="gfl",
    summary="GFL: 1 anchor, ATSS assignment, quality focal loss, distribution (DFL) + GIoU boxes",
    head=GFLHead,
    norm="gn",
    fpn_extra=("p5", False),
    anchors=(8.0, 1, (1.0,)),
    point_offset=0.0,
    nms_iou=0.6,
    loss_weights={"loss_cls": 1.0, "loss_bbox": 2.0, "loss_dfl": 0.25},
    box_losses=("giou",),
    assigner="atss",
    reuse_idx=3,
    kd=PredictionKD(cls_weight=1.0, reg_weight=4.0, reg_loss="kl"),
    mmdet_predictors=(("gfl_cls",), ("gfl_reg",), ()),
    build_head=_head,
    build_assigner=lambda cfg, decoder: ATSSAssigner(topk=9, ignore_iof_thr=cfg.ignore_iof_thr),
    build_decoder=lambda cfg, head: DistributionDecoder(head.reg_max, FAMILY.nms_iou),
    build_loss=lambda cfg, num_classes, decoder: GFLLoss(num_classes, FAMILY.loss_weights, decoder, "giou"),
)
