"""Per-head priors, targets, losses and box decoding: RetinaNet, ATSS, GFL, FCOS.

A criterion turns a head's raw outputs into named, weighted losses (``loss_cls``,
``loss_bbox``, ``loss_dfl``, ``loss_centerness``) and decodes boxes for inference. Heads never
compute losses (GUIDE: model / criterion / postprocess are separate).

Everything runs on the **flattened** batch: a head's per-level ``[B, A*C, H, W]`` outputs
become one ``[B, N, C]`` tensor (:func:`flatten`) whose row ``n`` is prior ``n`` of
:class:`Priors` (level-major, then y, then x, then the A anchors of a location; see
:mod:`kdctl.models.priors`). Losses are computed on all ``B * N`` rows with masks instead of
boolean indexing, so a training step has no host sync and no per-image loop.

References (MMDetection, open-mmlab/mmdetection ``mmdet/models/dense_heads``):
``retina_head.py``/``anchor_head.py`` (avg factor = number of positives, L1 on deltas),
``atss_head.py`` (GIoU weighted by the centerness target and averaged by its sum),
``gfl_head.py`` (QFL with the IoU of the detached decoded box; GIoU and DFL weighted by the
max predicted class score, averaged by its sum; DFL also divided by 4),
``fcos_head.py`` (IoU loss weighted by the centerness target, averaged by its sum).
Every averaging factor (#positives, sums of box-loss weights) goes through ``reduce`` (the mean
over processes in distributed training, identity on one process), as mmdet's ATSS, GFL and FCOS
heads do with ``reduce_mean``. Deviation: mmdet's RetinaNet (``AnchorHead``) divides by the
local #positives; kdctl averages it over processes like the other heads, so every GPU's loss
is normalised by the same factor.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdctl.models import priors as P
from kdctl.models.assigners import Assignment, ATSSAssigner, FCOSAssigner, MaxIoUAssigner
from kdctl.models.coders import ATSS_STDS, RETINANET_STDS, DeltaXYWHCoder, bbox2distance, distance2bbox, integral
from kdctl.models.losses import (
    DEFAULT_WEIGHTS,
    aligned_iou,
    centerness_target,
    distribution_focal_loss,
    focal_loss,
    giou_loss,
    iou_loss,
    quality_focal_loss,
    weighted_mean,
)

__all__ = ["Priors", "Criterion", "CRITERIA", "flatten", "build_criterion"]

Reduce = Callable[[Tensor], Tensor]


@dataclass
class Priors:
    """The priors of one input size, all levels concatenated (N rows).

    points   float32 [N, 2]  xy pixels: anchor centres (offset 0) or FCOS points (offset 0.5)
    stride   float32 [N]     stride of the row's level, pixels
    level    int64   [N]     level index (0 = P3)
    anchors  float32 [N, 4]  xyxy anchor boxes, or None for FCOS
    num_level_priors  rows per level (``H_l * W_l * A``)
    """

    points: Tensor
    stride: Tensor
    level: Tensor
    anchors: Tensor | None
    num_level_priors: list[int]


def flatten(levels: Sequence[Tensor], channels: int) -> Tensor:
    """Per-level ``[B, A*C, H, W]`` -> ``[B, N, C]`` with ``N = sum(H*W*A)``, rows in prior order."""
    B = levels[0].shape[0]
    return torch.cat([x.permute(0, 2, 3, 1).reshape(B, -1, channels) for x in levels], dim=1)


def _dummy_boxes(points: Tensor, stride: Tensor) -> Tensor:
    """A harmless target box per prior (a 4-stride square around it), used for the rows of
    non-positive priors so that IoU-type losses on all rows stay finite; those rows are then
    masked out with ``torch.where`` (never multiplied by 0, which would keep a NaN)."""
    half = (stride * 2.0)[..., None]
    return torch.cat([points - half, points + half], dim=-1)


class Criterion:
    """Base: owns the priors, the assigner and the loss weights of one head type.

    Subclasses set ``anchor_cfg`` (``(octave_base_scale, scales_per_octave, ratios)``, or None
    for points), ``point_offset`` and ``nms_iou`` (mmdet's test_cfg), and implement
    :meth:`assign`, :meth:`loss` and :meth:`decode`.

    ``prior_style`` "torchvision" makes the priors as torchvision's AnchorGenerator does
    (:func:`kdctl.models.priors.torchvision_priors`), for converted torchvision weights;
    ``centerness_score`` "sqrt" makes the inference score ``sqrt(cls * centerness)`` (torchvision's
    FCOS) instead of mmdet's ``cls * centerness`` (see :func:`kdctl.models.detector.postprocess`).
    """

    anchor_cfg: tuple[float, int, tuple[float, ...]] | None = (8.0, 1, (1.0,))
    point_offset: float = 0.0
    nms_iou: float = 0.6
    uses_centerness: bool = False  # inference score = cls score * sigmoid(centerness)

    def __init__(self, num_classes: int, strides: Sequence[int], weights: dict[str, float], box_loss: str, *,
                 prior_style: str = "mmdet", centerness_score: str = "mul"):
        self.prior_style = prior_style
        self.centerness_score = centerness_score
        self.num_classes = num_classes
        self.strides = list(strides)
        self.weights = dict(weights)
        self.box_loss = box_loss
        self._cache: dict[tuple, Priors] = {}

    @property
    def anchors_per_location(self) -> int:
        return 1 if self.anchor_cfg is None else P.num_anchors(self.anchor_cfg[1], self.anchor_cfg[2])

    # ------------------------------------------------------------------ priors
    def priors(self, sizes: Sequence[tuple[int, int]], device: torch.device) -> Priors:
        """Priors for feature maps of ``sizes`` (``(H_l, W_l)`` per level), cached per size."""
        key = (tuple(tuple(int(v) for v in s) for s in sizes), str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        k = self.anchors_per_location
        points, level, stride = P.grid_points(key[0], self.strides[: len(sizes)], self.point_offset, device)
        anchors = None
        if self.prior_style == "torchvision":  # same rows, other positions and anchor shapes
            points, anchors = P.torchvision_priors(key[0], self.strides[: len(sizes)], self.anchor_cfg, device)
            level, stride = (t.repeat_interleave(k, dim=0) for t in (level, stride))
        elif self.anchor_cfg is not None:
            base, n_scales, ratios = self.anchor_cfg
            anchors = P.anchors(key[0], self.strides[: len(sizes)], base, n_scales, ratios, device)
            points, level, stride = (t.repeat_interleave(k, dim=0) for t in (points, level, stride))
        pri = Priors(points, stride, level, anchors, [h * w * k for h, w in key[0]])
        if len(self._cache) > 64:  # many input sizes (multi-scale eval): keep the cache bounded
            self._cache.clear()
        self._cache[key] = pri
        return pri

    # ------------------------------------------------------------------ hooks
    def assign(self, priors: Priors, batch) -> Assignment:
        """The head's assigner on the batch's GTs and ignore regions (``Assignment`` ``[B, N]``);
        anchors are assigned where the head has them, else points."""
        return self.assigner(priors.points if priors.anchors is None else priors.anchors, batch.boxes, batch.labels,
                             batch.gt_mask, num_classes=self.num_classes, ignore=batch.ignore,
                             ignore_mask=batch.ignore_mask, **self.assign_extra(priors))

    def assign_extra(self, priors: Priors) -> dict:
        """Extra keyword arguments of this head's assigner."""
        return {}

    def decode(self, reg: Tensor, priors: Priors, index: Tensor | None = None) -> Tensor:
        """Boxes (xyxy pixels) from regression outputs ``reg`` ``[B, n, R]``; ``index``
        (int64 ``[B, n]``) picks the prior of each row, or None when ``n == N``."""
        raise NotImplementedError

    def cls_targets(self, assignment: Assignment, pred_boxes: Tensor | None = None) -> Tensor:
        """The classification target this head's loss pulls its sigmoid scores towards, float
        ``[B, N, K]``: focal-loss heads, one-hot of the assigned class at positives and 0 at
        background. Ignored rows (label -1) are 0 too; mask them with ``labels >= 0``.
        ``pred_boxes`` (xyxy ``[B, N, 4]``) is read only by quality targets (GFL)."""
        classes = torch.arange(self.num_classes, device=assignment.labels.device)
        return (assignment.labels[..., None] == classes).float()  # background K and ignore -1 match no column

    def loss(self, out: dict[str, Tensor], priors: Priors, batch, reduce: Reduce = lambda t: t,
             assignment: Assignment | None = None) -> dict[str, Tensor]:
        """Weighted named losses from flattened outputs (``out["cls"]`` ``[B, N, K]`` etc.);
        ``assignment``: this batch's :meth:`assign` result when the caller already has it (the
        distiller shares it with the KD losses), else computed here."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _gather(t: Tensor, index: Tensor | None) -> Tensor:
        """``t`` ``[N, C]`` (per prior) -> ``[B, n, C]`` at ``index``, or ``[1, N, C]``."""
        if index is None:
            return t[None]
        return t[index]

    def _num_pos(self, a: Assignment, reduce: Reduce) -> Tensor:
        return reduce(a.num_pos.float()).clamp(min=1.0)

    def _weighted(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: value * self.weights.get(name, 1.0) for name, value in losses.items()}


class RetinaCriterion(Criterion):
    """RetinaNet: 9 anchors (octave base 4, 3 scales, ratios 0.5/1/2), max-IoU 0.5/0.4, focal
    loss, L1 on DeltaXYWH deltas (stds 1) or GIoU on decoded boxes; both averaged by #pos."""

    anchor_cfg = (4.0, 3, (0.5, 1.0, 2.0))
    nms_iou = 0.5  # mmdet retinanet test_cfg

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.assigner = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0)
        # torchvision's BoxCoder clamps dw/dh from above only
        self.coder = DeltaXYWHCoder(stds=RETINANET_STDS, clamp_below=self.prior_style != "torchvision")

    def decode(self, reg, priors, index=None):
        return self.coder.decode(self._gather(priors.anchors, index), reg)

    def loss(self, out, priors, batch, reduce=lambda t: t, assignment=None):
        a = self.assign(priors, batch) if assignment is None else assignment
        num_pos = self._num_pos(a, reduce)
        cls = focal_loss(out["cls"].float(), a.labels)
        reg = out["reg"].float()
        pos = a.pos_mask[..., None]
        if self.box_loss == "giou":
            target = torch.where(pos, a.boxes, _dummy_boxes(priors.points, priors.stride)[None])
            box = torch.where(a.pos_mask, giou_loss(self.decode(reg, priors), target), 0.0)
        else:  # mmdet: L1Loss on encoded deltas, summed over the 4 coordinates
            box = torch.where(pos, (reg - self.coder.encode(priors.anchors[None], a.boxes)).abs(), 0.0)
        return self._weighted({"loss_cls": weighted_mean(cls, avg_factor=num_pos),
                               "loss_bbox": weighted_mean(box, avg_factor=num_pos)})


class ATSSCriterion(Criterion):
    """ATSS: one 8*stride anchor per location, ATSS assignment (top 9 per level), focal loss,
    GIoU on decoded DeltaXYWH boxes (stds 0.1/0.2) weighted by the centerness target and
    averaged by its sum, centerness BCE averaged by #pos."""

    nms_iou = 0.6
    uses_centerness = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.assigner = ATSSAssigner(topk=9)
        self.coder = DeltaXYWHCoder(stds=ATSS_STDS)

    def assign_extra(self, priors):
        return {"num_level_priors": priors.num_level_priors}

    def decode(self, reg, priors, index=None):
        return self.coder.decode(self._gather(priors.anchors, index), reg)

    def loss(self, out, priors, batch, reduce=lambda t: t, assignment=None):
        a = self.assign(priors, batch) if assignment is None else assignment
        num_pos = self._num_pos(a, reduce)
        cls = focal_loss(out["cls"].float(), a.labels)
        target = torch.where(a.pos_mask[..., None], a.boxes, _dummy_boxes(priors.points, priors.stride)[None])
        # mmdet atss_head.centerness_target: from the anchor centre to the GT's sides
        ctr_t = torch.where(a.pos_mask, centerness_target(bbox2distance(priors.points[None], target)), 0.0)
        box = torch.where(a.pos_mask, giou_loss(self.decode(out["reg"].float(), priors), target), 0.0)
        ctr = F.binary_cross_entropy_with_logits(out["centerness"].float().squeeze(-1), ctr_t, reduction="none")
        ctr = torch.where(a.pos_mask, ctr, 0.0)
        return self._weighted({
            "loss_cls": weighted_mean(cls, avg_factor=num_pos),
            "loss_bbox": weighted_mean(box, ctr_t, avg_factor=reduce(ctr_t.sum()), min_factor=1.0),
            "loss_centerness": weighted_mean(ctr, avg_factor=num_pos),
        })


class GFLCriterion(Criterion):
    """GFL: ATSS assignment on 8*stride anchors; the box is ``integral(distribution) * stride``
    from the anchor centre. QFL with target IoU(decoded box (detached), GT), averaged by #pos;
    GIoU and DFL (reg_max 16) weighted by the prior's max predicted class score (detached) and
    averaged by its sum; DFL is also divided by 4 (mmdet ``avg_factor=4.0``)."""

    nms_iou = 0.6

    def __init__(self, *args, reg_max: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.reg_max = reg_max
        self.assigner = ATSSAssigner(topk=9)

    def assign_extra(self, priors):
        return {"num_level_priors": priors.num_level_priors}

    def decode(self, reg, priors, index=None):
        dist = integral(reg, self.reg_max) * self._gather(priors.stride[:, None], index)
        return distance2bbox(self._gather(priors.points, index), dist)

    def cls_targets(self, assignment, pred_boxes=None):
        """QFL's soft target: at positives, IoU(``pred_boxes``, assigned GT) on the assigned class
        (the ``score`` of :meth:`loss`, whose ``pred_boxes`` are its own detached decoded boxes);
        0 elsewhere. Without ``pred_boxes``, the one-hot of a perfect box (IoU 1)."""
        onehot = super().cls_targets(assignment)
        if pred_boxes is None:
            return onehot
        iou = torch.where(assignment.pos_mask, aligned_iou(pred_boxes.float(), assignment.boxes), 0.0)
        return onehot * iou[..., None]

    def loss(self, out, priors, batch, reduce=lambda t: t, assignment=None):
        a = self.assign(priors, batch) if assignment is None else assignment
        num_pos = self._num_pos(a, reduce)
        cls_logits, reg = out["cls"].float(), out["reg"].float()
        pos = a.pos_mask
        target = torch.where(pos[..., None], a.boxes, _dummy_boxes(priors.points, priors.stride)[None])
        pred_box = self.decode(reg, priors)
        score = torch.where(pos, aligned_iou(pred_box.detach(), target), 0.0)
        cls = quality_focal_loss(cls_logits, a.labels, score)
        weight = torch.where(pos, cls_logits.detach().sigmoid().amax(dim=-1), 0.0)  # [B, N]
        avg = reduce(weight.sum())
        box = torch.where(pos, giou_loss(pred_box, target), 0.0)
        stride = priors.stride[None, :, None]
        corners = bbox2distance(priors.points[None] / stride, target / stride, max_dist=self.reg_max)
        dfl = distribution_focal_loss(reg.unflatten(-1, (4, self.reg_max + 1)), corners)  # [B, N, 4]
        dfl = torch.where(pos[..., None], dfl, 0.0)
        return self._weighted({
            "loss_cls": weighted_mean(cls, avg_factor=num_pos),
            "loss_bbox": weighted_mean(box, weight, avg_factor=avg),
            "loss_dfl": weighted_mean(dfl, weight, avg_factor=avg) / 4.0,
        })


class FCOSCriterion(Criterion):
    """FCOS: points at cell centres, centre sampling (radius 1.5) and per-level scale ranges,
    focal loss averaged by #pos, IoU (-log) or GIoU loss on decoded boxes weighted by the
    centerness target and averaged by its sum, centerness BCE averaged by #pos."""

    anchor_cfg = None
    point_offset = P.FCOS_POINT_OFFSET
    nms_iou = 0.5  # mmdet fcos test_cfg
    uses_centerness = True

    def __init__(self, *args, norm_on_bbox: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_on_bbox = norm_on_bbox
        self.assigner = FCOSAssigner(center_sampling=True, center_sample_radius=1.5)

    def assign_extra(self, priors):
        return {"stride": priors.stride, "level": priors.level}

    def decode(self, reg, priors, index=None):
        dist = reg * self._gather(priors.stride[:, None], index) if self.norm_on_bbox else reg
        return distance2bbox(self._gather(priors.points, index), dist)

    def loss(self, out, priors, batch, reduce=lambda t: t, assignment=None):
        a = self.assign(priors, batch) if assignment is None else assignment
        num_pos = self._num_pos(a, reduce)
        pos = a.pos_mask
        cls = focal_loss(out["cls"].float(), a.labels)
        target = torch.where(pos[..., None], a.boxes, _dummy_boxes(priors.points, priors.stride)[None])
        ctr_t = torch.where(pos, centerness_target(bbox2distance(priors.points[None], target)), 0.0)
        pred_box = self.decode(out["reg"].float(), priors)
        box = giou_loss(pred_box, target) if self.box_loss == "giou" else iou_loss(pred_box, target)
        box = torch.where(pos, box, 0.0)
        ctr = F.binary_cross_entropy_with_logits(out["centerness"].float().squeeze(-1), ctr_t, reduction="none")
        ctr = torch.where(pos, ctr, 0.0)
        return self._weighted({
            "loss_cls": weighted_mean(cls, avg_factor=num_pos),
            # mmdet fcos_head: centerness_denorm = max(reduce_mean(sum of targets), 1e-6)
            "loss_bbox": weighted_mean(box, ctr_t, avg_factor=reduce(ctr_t.sum()), min_factor=1e-6),
            "loss_centerness": weighted_mean(ctr, avg_factor=num_pos),
        })


CRITERIA: dict[str, type[Criterion]] = {
    "retinanet": RetinaCriterion,
    "atss": ATSSCriterion,
    "gfl": GFLCriterion,
    "fcos": FCOSCriterion,
}


def build_criterion(head: str, num_classes: int, strides: Sequence[int], box_loss: str = "auto", **kwargs) -> Criterion:
    """The criterion of ``head`` with MMDetection's default loss weights; ``box_loss`` "auto"
    keeps the head's own box loss. GIoU replacing RetinaNet's L1 gets weight 2.0, as in the
    GIoU heads of mmdet's ATSS/GFL configs (mmdet has no RetinaNet-GIoU reference config)."""
    weights = dict(DEFAULT_WEIGHTS[head])
    if head == "retinanet" and box_loss == "giou":
        weights["loss_bbox"] = 2.0
    return CRITERIA[head](num_classes, strides, weights, box_loss, **kwargs)
