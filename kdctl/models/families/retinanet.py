"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) as MMDetection's
``RetinaHead`` (``configs/_base_/models/retinanet_r50_fpn.py``).

9 anchors per location (octave base 4, 3 scales x ratios 0.5/1/2), max-IoU assignment 0.5/0.4,
sigmoid focal loss, ``DeltaXYWH`` deltas (stds 1) with L1 on the deltas (or GIoU on decoded
boxes); both averaged by #pos. Plain-conv towers with bias (``norm_cfg=None``), no per-level
``Scale``; P6 from C5. NMS IoU 0.5. CrossKD (``crosskd_r50_retinanet_r18_fpn_1x_coco``):
reuse_idx 3, KD-QFL 1.0 + GIoU 1.0.
"""
from __future__ import annotations

from typing import Literal

import torch

from kdctl.models.assigners import MaxIoUAssigner
from kdctl.models.coders import RETINANET_STDS, DeltaXYWHCoder
from kdctl.models.decoders import DeltaDecoder
from kdctl.models.families.family import DetectionLoss, Family, PredictionKD, padded_targets
from kdctl.models.head import DenseHead
from kdctl.models.losses import focal_loss, giou_loss, weighted_mean


class RetinaHead(DenseHead):
    """Outputs per level: ``cls`` ``[B, A*K, H, W]`` logits, ``reg`` ``[B, A*4, H, W]`` deltas
    (dx, dy, dw, dh per anchor, anchor-major: channel ``a*4 + j``)."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 num_anchors: int = 9, norm: Literal["gn", "bn", "none"] = "none", num_groups: int = 32,
                 num_levels: int = 5, conv_bias: bool | None = None):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_anchors=num_anchors, reg_channels=4,
                         centerness_on=None, num_levels=num_levels, use_scale=False, norm=norm, num_groups=num_groups,
                         conv_bias=conv_bias)


class RetinaLoss(DetectionLoss):
    """Focal loss, and L1 on DeltaXYWH deltas (mmdet ``L1Loss``, summed over the 4 coordinates) or
    GIoU on decoded boxes; both averaged by #pos."""

    def __call__(self, flat, priors, assignment, reduce=lambda t: t):
        a = assignment
        num_pos = self.num_pos(a, reduce)
        cls = focal_loss(flat["cls"].float(), a.labels)
        reg = flat["reg"].float()
        if self.box_loss == "giou":
            box = torch.where(a.pos_mask, giou_loss(self.decoder.decode(reg, priors), padded_targets(a, priors)), 0.0)
        else:
            box = torch.where(a.pos_mask[..., None], (reg - self.decoder.coder.encode(priors.anchors[None], a.boxes)).abs(), 0.0)
        return self.weighted({"loss_cls": weighted_mean(cls, avg_factor=num_pos),
                              "loss_bbox": weighted_mean(box, avg_factor=num_pos)})


def _decoder(cfg, head) -> DeltaDecoder:
    # torchvision's BoxCoder clamps dw/dh from above only
    return DeltaDecoder(DeltaXYWHCoder(stds=RETINANET_STDS, clamp_below=cfg.variant.priors != "torchvision"), FAMILY.nms_iou)


def _loss(cfg, num_classes, decoder) -> RetinaLoss:
    box = FAMILY.box_losses[0] if cfg.box_loss == "auto" else cfg.box_loss
    weights = dict(FAMILY.loss_weights)
    if box == "giou":  # as the GIoU heads of mmdet's ATSS/GFL configs (mmdet has no RetinaNet-GIoU config)
        weights["loss_bbox"] = 2.0
    return RetinaLoss(num_classes, weights, decoder, box)


def _head(cfg, num_classes, in_channels, num_levels, norm) -> RetinaHead:
    return RetinaHead(num_classes, in_channels, cfg.feat_channels, cfg.stacked_convs, norm=norm, num_levels=num_levels,
                      conv_bias=cfg.variant.head_conv_bias)


FAMILY = Family(
    name="retinanet",
    summary="RetinaNet: 9 anchors, max-IoU assignment, focal loss, L1 (or GIoU) on deltas",
    head=RetinaHead,
    norm="none",
    fpn_extra=("c5", False),
    anchors=(4.0, 3, (0.5, 1.0, 2.0)),
    point_offset=0.0,
    nms_iou=0.5,
    loss_weights={"loss_cls": 1.0, "loss_bbox": 1.0},
    box_losses=("l1", "giou"),
    assigner="max-iou",
    reuse_idx=3,
    kd=PredictionKD(cls_weight=1.0, reg_weight=1.0, reg_loss="giou"),
    mmdet_predictors=(("retina_cls",), ("retina_reg",), ()),
    build_head=_head,
    build_assigner=lambda cfg, decoder: MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0,
                                                       ignore_iof_thr=cfg.ignore_iof_thr),
    build_decoder=_decoder,
    build_loss=_loss,
)
