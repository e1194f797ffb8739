"""What a detector family is: :class:`Family`, the one record that says everything particular to
it, and :class:`DetectionLoss`, the base of its losses.

A family module (``retinanet.py``, ``atss.py``, ``gfl.py``, ``fcos.py``, ``yolo.py``) defines its
head class, its loss class and one ``FAMILY = Family(...)`` (``yolo.py`` also its own neck rule,
``build_neck``); :data:`kdctl.models.families.FAMILIES` lists
them. :func:`kdctl.models.detector.build_detector` builds every detector through these fields,
and the recipe checks, CrossKD, the conflict analysis and the hub read them; nothing else in
kdctl keeps a per-family table.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from kdctl.models.assigners import Assigner, Assignment
from kdctl.models.coders import bbox2distance
from kdctl.models.contract import DENSE_CAPABILITIES
from kdctl.models.decoders import BoxDecoder
from kdctl.models.head import DenseHead
from kdctl.models.losses import centerness_target
from kdctl.models.necks import FPN
from kdctl.models.priors import AnchorConfig, Priors

Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class PredictionKD:
    """A family's prediction-KD losses (CrossKD's cross-head predictions and ``pred_mimic``), from
    the official CrossKD configs (``configs/crosskd/crosskd_r50_*``); see
    :mod:`kdctl.distill.prediction`."""

    cls_weight: float
    reg_weight: float
    reg_loss: Literal["kl", "giou", "iou"]
    ctr_weight: float = 0.0  # centerness KD (ATSS only)
    mask_invalid: bool = True  # FCOS counts every point; the others only priors with label weight 1
    norm: Literal["num_pos", "centerness"] = "num_pos"  # FCOS: the positives' centerness-target sum


def dummy_boxes(points: Tensor, stride: Tensor) -> Tensor:
    """A harmless target box per prior (a 4-stride square around it), used for the rows of
    non-positive priors so that IoU-type losses on all rows stay finite; those rows are then
    masked out with ``torch.where`` (never multiplied by 0, which would keep a NaN)."""
    half = (stride * 2.0)[..., None]
    return torch.cat([points - half, points + half], dim=-1)


def padded_targets(assignment: Assignment, priors: Priors) -> Tensor:
    """The assigned GT box at positives and :func:`dummy_boxes` elsewhere, ``[B, N, 4]``."""
    return torch.where(assignment.pos_mask[..., None], assignment.boxes,
                       dummy_boxes(priors.points, priors.stride)[None])


def centerness_targets(assignment: Assignment, priors: Priors, targets: Tensor | None = None) -> Tensor:
    """FCOS centerness of each positive prior's centre in its GT box (mmdet
    ``centerness_target``; ATSS from the anchor centre), 0 elsewhere: ``[B, N]``. ``targets``:
    :func:`padded_targets` when the caller already has them."""
    targets = padded_targets(assignment, priors) if targets is None else targets
    ltrb = bbox2distance(priors.points[None], targets)
    return torch.where(assignment.pos_mask, centerness_target(ltrb), 0.0)


class DetectionLoss:
    """Base of a family's losses: ``loss(flat, priors, assignment, reduce)`` -> named weighted
    losses (``loss_cls``, ``loss_bbox``, ...).

    Args:
        num_classes: K.
        weights: loss name -> weight (applied here, in :meth:`weighted`, and nowhere else).
        decoder: the family's box decoder (box losses decode with it).
        box_loss: the family's box-loss choice (``model.*.box_loss`` resolved).

    ``flat`` is the flattened batch (``{"cls": [B, N, K], "reg": [B, N, R], "centerness":
    [B, N, 1]}``); every averaging factor goes through ``reduce`` (mean over processes).
    """

    quality_target: bool = False  # cls_targets are IoU-quality scores at positives (GFL's QFL), not one-hot

    def __init__(self, num_classes: int, weights: Mapping[str, float], decoder: BoxDecoder, box_loss: str):
        self.num_classes = num_classes
        self.weights = dict(weights)
        self.decoder = decoder
        self.box_loss = box_loss

    def __call__(self, flat: dict[str, Tensor], priors: Priors, assignment: Assignment,
                 reduce: Reduce = lambda t: t) -> dict[str, Tensor]:
        raise NotImplementedError

    def cls_targets(self, assignment: Assignment, pred_boxes: Tensor | None = None) -> Tensor:
        """The classification target the loss pulls the sigmoid scores towards, float
        ``[B, N, K]`` (the conflict analysis reads it): focal-loss families, one-hot of the
        assigned class at positives and 0 at background. Ignored rows (label -1) are 0 too.
        ``pred_boxes`` (xyxy ``[B, N, 4]``) is read only by quality targets (GFL)."""
        classes = torch.arange(self.num_classes, device=assignment.labels.device)
        return (assignment.labels[..., None] == classes).float()  # background K and ignore -1 match no column

    def num_pos(self, a: Assignment, reduce: Reduce) -> Tensor:
        return reduce(a.num_pos.float()).clamp(min=1.0)

    def weighted(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: value * self.weights.get(name, 1.0) for name, value in losses.items()}


def centerness_score(cfg) -> str:
    """The score rule of a centerness family: ``variant.centerness_score`` "sqrt" (torchvision's
    FCOS) -> "sqrt-centerness", else mmdet's "centerness" (see :mod:`kdctl.models.decoders`)."""
    return "sqrt-centerness" if cfg.variant.centerness_score == "sqrt" else "centerness"


def fpn_neck(family: "Family", cfg, backbone) -> FPN:
    """The FPN of ``cfg`` on ``backbone`` with the family's extra-level rule (P6 source, ReLU
    before P7) unless ``cfg.variant`` overrides it."""
    if family.fpn_extra is None:
        raise ValueError(f"family {family.name!r} has no FPN extra-level rule (fpn_extra); give it its own build_neck")
    v = cfg.variant
    extra_from, relu_p7 = family.fpn_extra
    extra_from = extra_from if v.p6_from == "auto" else v.p6_from
    relu_p7 = relu_p7 if v.relu_before_p7 is None else v.relu_before_p7
    return FPN(backbone.channels, cfg.fpn_channels, extra_from=extra_from, relu_before_p7=relu_p7,
               in_strides=backbone.strides)


@dataclass(frozen=True)
class Family:
    """Everything particular to one detector family.

    Settings (from the family's MMDetection R50 configs unless said otherwise):
        name, summary: the recipe's ``model.*.head`` value and a one-line description.
        norm: default tower norm (``model.*.norm: auto``).
        fpn_extra: (P6 source ``"c5"``/``"p5"``, ReLU before P7) for the default FPN neck;
            None for a family with its own ``build_neck``.
        anchors: prior generator ``(octave_base_scale, scales_per_octave, ratios)``, or None for points.
        point_offset: prior position in the cell, in strides.
        nms_iou: test_cfg NMS IoU.
        loss_weights: loss name -> weight.
        box_losses: accepted ``model.*.box_loss`` values; the first is what ``auto`` means.
        assigner: the assigner's name (shown by ``kdctl analyze-conflict``).
        reuse_idx: CrossKD's default ``reuse_idx`` (official configs).
        kd: prediction-KD weights and losses.
        neck_levels: how many levels the family's neck gives from P3 (5: P3-P7 for the FPN families).
        capabilities: what its detectors offer the KD methods (:data:`kdctl.models.contract.CAPABILITIES`;
            every dense family: neck, dense outputs, dense tower).
        mmdet_predictors: the hub's MMDetection conversion hook: ``(cls, reg, centerness)``
            predictor module names of the mmdet head, newest first; None when MMDetection has
            no such head (the family's teachers cannot be converted from MMDetection).

    Builders (``cfg`` is the recipe's ``DetectorConfig``; they read it, the parts take plain
    arguments): ``build_head(cfg, num_classes, in_channels, num_levels, norm)``,
    ``build_decoder(cfg, head)``, ``build_assigner(cfg, decoder)`` (a prediction-aware assigner
    decodes the predicted boxes with it), ``build_loss(cfg, num_classes, decoder)``,
    ``build_neck(family, cfg, backbone)`` (default: :func:`fpn_neck`).
    """

    name: str
    summary: str
    head: type[DenseHead]
    norm: str
    anchors: AnchorConfig | None
    point_offset: float
    nms_iou: float
    loss_weights: Mapping[str, float]
    box_losses: tuple[str, ...]
    assigner: str
    reuse_idx: int
    kd: PredictionKD
    build_head: Callable[..., DenseHead]
    build_assigner: Callable[..., Assigner]
    build_decoder: Callable[..., BoxDecoder]
    build_loss: Callable[..., DetectionLoss]
    fpn_extra: tuple[Literal["c5", "p5"], bool] | None = None
    mmdet_predictors: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None
    build_neck: Callable[..., torch.nn.Module] = field(default=fpn_neck)
    neck_levels: int = 5
    capabilities: frozenset[str] = DENSE_CAPABILITIES
