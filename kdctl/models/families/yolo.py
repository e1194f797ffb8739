"""A YOLO-style real-time family, written from the papers (no YOLO implementation was read):

- backbone: any timm CNN; the recipes use kdctl's own CSP-ELAN darknet (:mod:`kdctl.models.cspelan`,
  ``cspelan_n`` / ``_s`` / ``_m``), measured better and cheaper than timm's ``cs3darknet_*``;
- neck: a PAN over P3-P5 (:class:`kdctl.models.necks.PAN`; PANet, CSPNet), its width and depth
  scaled by ``model.*.yolo.width`` / ``.depth`` (:func:`pan_neck`); by default the widths double
  per level (``yolo.neck_widths: pyramid``, YOLOv4's PAN: ``w, 2w, 4w``) and every fusion block is
  a CSP-ELAN block without shortcuts (``yolo.neck_block: elan``);
- head: decoupled per level (YOLOX, Ge et al., "YOLOX: Exceeding YOLO Series in 2021"): for
  each level its own cls and reg towers of ``stacked_convs`` (2) conv3x3-BN-SiLU blocks, a 1x1
  cls conv and a 1x1 reg conv predicting GFL's distance distribution (Li et al., "Generalized
  Focal Loss", NeurIPS 2020) over bins ``0..reg_max`` (16, kdctl's convention: 17 bins, as
  the gfl family) per side, in strides from anchor-free points at the cell centres (offset
  0.5); no per-level ``Scale``;
- assigner: task-aligned (TOOD, :mod:`kdctl.models.tal`), alpha 0.5, beta 6.0, top 10;
- losses (:class:`YOLOLoss`): BCE of the cls logits against TOOD's normalised alignment targets
  (every non-ignored prior and class), CIoU (Zheng et al., "Enhancing Geometric Factors in
  Model Learning and Inference for Object Detection and Instance Segmentation", 2021; the
  AAAI 2020 "Distance-IoU Loss" paper defines it) and DFL, both at positives weighted by the
  target score; all three divided by the sum of the target scores. Weights 0.5 / 7.5 / 1.5
  (the usual real-time defaults), recipe fields ``model.*.yolo.cls_weight`` etc.;
- inference: score = sigmoid(cls), NMS IoU 0.7 (the usual real-time setting);
- initialisation and BatchNorm: the head's convs keep PyTorch's default init
  (``yolo.head_init: default``; mmdet's normal(0, 0.01) is ``normal``), the cls biases the
  stride-aware prior below; neck and head BatchNorm momentum 0.03, eps 1e-3
  (``yolo.bn_momentum`` / ``bn_eps``, the real-time detectors' values; PyTorch's are 0.1, 1e-5).

The defaults of the last two items and of the neck are measured (BENCHMARKS.md, "Peer parity":
on the demo-yolo protocol, seed 0, yolo-n went 6.9 AP -> 7.6 with the CSP-ELAN backbone, 8.9 with
the pyramid ELAN neck, PyTorch init and the BatchNorm values, 13.3 / 13.5 (seeds 0 / 1) with the
recipes' gradient clip as well).

CrossKD: the head's towers are per level, so ``forward_tower`` takes the level
(:mod:`kdctl.models.head`). The KD losses are GFL's analogues (KD-QFL on cls, KL of the
distance distributions weighted by the teacher's max score) with GFL's weights 1.0 / 4.0;
``reuse_idx`` 0 (the student's neck features, through one 1x1 adapter per branch and level
where the widths differ, then the teacher's whole towers and predictors), chosen by measurement
on the current defaults (BENCHMARKS.md, "Peer parity": yolo-s -> yolo-n on the demo protocol,
final AP over seeds 0-2: 17.8 +- 1.2 at 0, 14.5 +- 1.3 at 1, 15.7 +- 1.1 at 2; prediction
mimicking 17.4 +- 1.5). On the former neck and backbone 2 had been best (10.2 +- 0.8 against
9.3 +- 0.9 at 1).

Weight EMA (``train.ema``, :mod:`kdctl.engine.ema`) and mosaic / affine / HSV augmentation
(``data.augment``, :mod:`kdctl.data.augment`), which real-time detectors train with, are not
this family's: every family can use them.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import complete_box_iou_loss

from kdctl.models.coders import bbox2distance
from kdctl.models.decoders import DistributionDecoder
from kdctl.models.families.family import DetectionLoss, Family, PredictionKD, padded_targets
from kdctl.models.head import DenseHead
from kdctl.models.losses import distribution_focal_loss, weighted_mean
from kdctl.models.blocks import scaled_depth, scaled_width, set_batchnorm
from kdctl.models.necks.pan import PAN
from kdctl.models.tal import TaskAlignedAssigner

# the prior of the stride-aware cls bias: about this many objects in an image of this size
PRIOR_OBJECTS, PRIOR_IMAGE = 5.0, 640.0
PAN_DEPTH = 3  # bottlenecks per CSP block at depth multiple 1.0


def ciou_loss(pred, target, eps: float = 1e-7):
    """CIoU loss ``1 - IoU + rho^2(b, b_gt) / c^2 + alpha * v`` of matching xyxy boxes (Zheng et
    al.): ``rho`` the distance of the centres, ``c`` the diagonal of the smallest enclosing box,
    ``v = 4 / pi^2 * (atan(w_gt / h_gt) - atan(w / h))^2``, ``alpha = v / ((1 - IoU) + v)``
    (not differentiated, as the paper's gradient treats it), via ``torchvision.ops``.
    ``[..., 4], [..., 4] -> [...]``."""
    return complete_box_iou_loss(pred, target, reduction="none", eps=eps)


def stride_prior_bias(num_classes: int, stride: float) -> float:
    """The initial cls logit of a level with ``stride``: ``logit(p)`` with ``p = PRIOR_OBJECTS /
    (K * (PRIOR_IMAGE / stride)^2)``, i.e. a few objects per image spread over the level's cells
    and the classes. The prior-probability init of Lin et al. (focal loss, Sec. 4.1) made per
    level, as real-time detectors do, so that coarse levels (fewer cells) start more confident."""
    p = min(PRIOR_OBJECTS / (num_classes * (PRIOR_IMAGE / stride) ** 2), 0.5)
    return math.log(p / (1 - p))


class YOLOHead(DenseHead):
    """Decoupled per-level head. Outputs per level: ``cls`` ``[B, K, H, W]`` logits; ``reg``
    ``[B, 4*(reg_max+1), H, W]`` distribution logits, side-major (left, top, right, bottom).

    Args: as :class:`DenseHead`, plus ``reg_max`` and ``strides`` (one per level, pixels; for the
    stride-aware cls bias, :func:`stride_prior_bias`)."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 64, stacked_convs: int = 2,
                 norm: Literal["gn", "bn", "none"] = "bn", num_groups: int = 32, num_levels: int = 3,
                 reg_max: int = 16, strides: list[float] | None = None, init: str = "normal"):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_anchors=1,
                         reg_channels=4 * (reg_max + 1), centerness_on=None, num_levels=num_levels, use_scale=False,
                         norm=norm, num_groups=num_groups, per_level=True, activation="silu", pred_kernel=1)
        if init == "default":  # PyTorch's own conv init (kaiming-uniform) instead of mmdet's normal(0, 0.01)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    module.reset_parameters()
        elif init != "normal":
            raise ValueError(f"init must be 'normal' or 'default', got {init!r}")
        self.reg_max = reg_max
        self.strides = list(strides) if strides is not None else [8.0 * 2 ** i for i in range(num_levels)]
        if len(self.strides) != num_levels:
            raise ValueError(f"got {len(self.strides)} strides for {num_levels} levels")
        for conv, stride in zip(self.cls_pred, self.strides):
            nn.init.constant_(conv.bias, stride_prior_bias(num_classes, stride))


class YOLOLoss(DetectionLoss):
    """BCE on the alignment targets, CIoU and DFL (see the module docstring); every term divided
    by the (all-reduced) sum of the target scores, at least 1."""

    quality_target = True

    def cls_targets(self, assignment, pred_boxes=None):
        """TOOD's normalised alignment metric on the assigned class at positives (the
        :class:`~kdctl.models.tal.AlignedAssignment`'s ``scores``), 0 elsewhere; an assignment
        without soft scores gives the one-hot target. ``pred_boxes`` is not read."""
        onehot = super().cls_targets(assignment)
        scores = getattr(assignment, "scores", None)
        return onehot if scores is None else onehot * scores[..., None]

    def __call__(self, flat, priors, assignment, reduce=lambda t: t):
        a = assignment
        reg_max = self.decoder.reg_max
        cls_logits, reg = flat["cls"].float(), flat["reg"].float()
        pos = a.pos_mask
        target_cls = self.cls_targets(a)  # [B, N, K]
        weight = target_cls.amax(dim=-1)  # [B, N]: the target score at positives, 0 elsewhere
        avg = reduce(weight.sum())
        bce = F.binary_cross_entropy_with_logits(cls_logits, target_cls, reduction="none")
        bce = torch.where((a.labels >= 0)[..., None], bce, 0.0)  # ignored priors: no loss
        target = padded_targets(a, priors)
        pred_box = self.decoder.decode(reg, priors)
        box = torch.where(pos, ciou_loss(pred_box, target), 0.0)
        stride = priors.stride[None, :, None]
        corners = bbox2distance(priors.points[None] / stride, target / stride, max_dist=reg_max)
        dfl = distribution_focal_loss(reg.unflatten(-1, (4, reg_max + 1)), corners).mean(dim=-1)  # [B, N]
        dfl = torch.where(pos, dfl, 0.0)
        return self.weighted({
            "loss_cls": weighted_mean(bce, avg_factor=avg),
            "loss_bbox": weighted_mean(box, weight, avg_factor=avg),
            "loss_dfl": weighted_mean(dfl, weight, avg_factor=avg),
        })


def pan_neck(family: Family, cfg, backbone) -> PAN:
    """The PAN of ``cfg`` on ``backbone``: ``w = fpn_channels * yolo.width`` wide at every level
    (``yolo.neck_widths: uniform``) or ``w, 2w, 4w`` at P3-P5 (``pyramid``), ``3 * yolo.depth``
    blocks per fusion block (both rounded, :func:`scaled_width` / :func:`scaled_depth`), fusion
    blocks ``yolo.neck_block``."""
    y = cfg.yolo
    w = scaled_width(cfg.fpn_channels, y.width)
    widths = w if y.neck_widths == "uniform" else [w, 2 * w, 4 * w]
    return set_batchnorm(PAN(backbone.channels, widths, scaled_depth(PAN_DEPTH, y.depth), in_strides=backbone.strides,
                             block=y.neck_block), y.bn_momentum, y.bn_eps)


def _head(cfg, num_classes, in_channels, num_levels, norm) -> YOLOHead:
    # the PAN's levels double from stride 8 (P3); the head's width scales with the neck's
    y = cfg.yolo
    head = YOLOHead(num_classes, in_channels, scaled_width(cfg.feat_channels, y.width), cfg.stacked_convs,
                    norm=norm, num_levels=num_levels, strides=[8.0 * 2 ** i for i in range(num_levels)],
                    init=y.head_init)
    return set_batchnorm(head, y.bn_momentum, y.bn_eps)


def _assigner(cfg, decoder) -> TaskAlignedAssigner:
    y = cfg.yolo
    return TaskAlignedAssigner(decoder, alpha=y.tal_alpha, beta=y.tal_beta, topk=y.tal_topk,
                               ignore_iof_thr=cfg.ignore_iof_thr)


def _loss(cfg, num_classes, decoder) -> YOLOLoss:
    y = cfg.yolo  # a weight left None is the family's
    given = {"loss_cls": y.cls_weight, "loss_bbox": y.box_weight, "loss_dfl": y.dfl_weight}
    weights = {name: FAMILY.loss_weights[name] if w is None else w for name, w in given.items()}
    return YOLOLoss(num_classes, weights, decoder, "ciou")


FAMILY = Family(
    name="yolo",
    summary="YOLO-style: PAN (CSP-ELAN, widths doubling per level) P3-P5, decoupled per-level head, task-aligned assignment, BCE + CIoU + DFL",
    head=YOLOHead,
    norm="bn",
    fpn_extra=None,
    anchors=None,
    point_offset=0.5,
    nms_iou=0.7,
    loss_weights={"loss_cls": 0.5, "loss_bbox": 7.5, "loss_dfl": 1.5},
    box_losses=("ciou",),
    assigner="task-aligned",
    reuse_idx=0,  # measured, see the module docstring
    kd=PredictionKD(cls_weight=1.0, reg_weight=4.0, reg_loss="kl"),
    mmdet_predictors=None,
    neck_levels=3,  # the PAN's P3-P5
    build_head=_head,
    build_assigner=_assigner,
    build_decoder=lambda cfg, head: DistributionDecoder(head.reg_max, FAMILY.nms_iou),
    build_loss=_loss,
    build_neck=pan_neck,
)
