"""``Detector`` = backbone + neck + dense head, with its family's parts: prior generator,
assigner, box decoder and losses; the dense implementation of the meta-architecture contract
(:mod:`kdctl.models.contract`). ``build_detector`` wires one from a recipe section.

- ``detector(images)`` -> raw per-level head outputs (``{"cls": [...], "reg": [...], ...}``);
- ``detector.loss(outputs, batch)`` -> named weighted losses (``loss_cls``, ``loss_bbox``, ...);
- ``detector.predict(images, valid_sizes, scales)`` -> :class:`Detections` in original image
  pixels (:func:`kdctl.models.postprocess.postprocess`, which needs the decoder only).

``build_detector(cfg, num_classes)`` reads a recipe's ``model.student`` / ``model.teacher``
section through the family's builders; the modules themselves take plain arguments. It builds a
randomly initialised detector: loading weights is the caller's (``kdctl.artifact.checkpoint``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError
from kdctl.models.assigners import Assigner, Assignment
from kdctl.models.backbone import Backbone
from kdctl.models.contract import DenseShared, MetaArchitecture, Taps
from kdctl.models.decoders import BoxDecoder
from kdctl.models.families import Family, get_family
from kdctl.models.families.family import DetectionLoss
from kdctl.models.head import DenseHead, class_rows, keep_conv_rows
from kdctl.models.postprocess import CanvasCandidates, Detections, postprocess
from kdctl.models.priors import PriorGenerator, Priors

__all__ = ["Detector", "Detections", "FamilyParts", "build_detector", "build_parts", "flatten"]


def flatten(levels: list[Tensor], channels: int) -> Tensor:
    """Per-level ``[B, A*C, H, W]`` -> ``[B, N, C]`` with ``N = sum(H*W*A)``, rows in prior order."""
    B = levels[0].shape[0]
    return torch.cat([x.permute(0, 2, 3, 1).reshape(B, -1, channels) for x in levels], dim=1)


class Detector(MetaArchitecture):
    """A one-stage dense detector (capabilities: neck, dense outputs, dense tower).

    Args:
        backbone: a :class:`Backbone` (C3-C5).
        neck: a neck (:mod:`kdctl.models.necks`) with ``strides``, ``out_channels``, ``num_outs``.
        head: a :class:`DenseHead` over the neck's levels.
        prior_generator: the priors of the neck's levels.
        assigner: labels priors from GTs (and, for prediction-aware assigners, the predictions).
        decoder: boxes, inference score rule and NMS IoU.
        loss: the family's :class:`~kdctl.models.families.family.DetectionLoss`.
        family: the :class:`~kdctl.models.families.Family` record it was built from.

    Only backbone, neck and head are submodules (the checkpoint's keys); the other parts hold no
    tensors. ``mean``/``std`` are the backbone's input normalisation (RGB in [0, 1]).
    """

    @property
    def capabilities(self) -> frozenset[str]:
        """Its family's (:attr:`Family.capabilities`)."""
        return self.family.capabilities

    def __init__(self, backbone: Backbone, neck: nn.Module, head: DenseHead, prior_generator: PriorGenerator,
                 assigner: Assigner, decoder: BoxDecoder, loss: DetectionLoss, family: Family):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.prior_generator = prior_generator
        self.assigner = assigner
        self.decoder = decoder
        self.detection_loss = loss
        self.family = family
        self.mean, self.std = backbone.mean, backbone.std

    @property
    def num_classes(self) -> int:
        """K, the head's classes."""
        return self.head.num_classes

    @property
    def strides(self) -> list[int]:
        """The neck's level strides, pixels."""
        return list(self.neck.strides)

    # ------------------------------------------------------------------ forward
    def features(self, images: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` normalised images -> neck levels ``[B, C, H_l, W_l]``."""
        return self.neck(self.backbone(images))

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        """Raw per-level head outputs (see :meth:`DenseHead.forward`)."""
        return self.head(self.features(images))

    def priors(self, outputs: dict[str, list[Tensor]]) -> Priors:
        """The priors matching ``outputs`` (by the sizes of its levels)."""
        sizes = [tuple(x.shape[-2:]) for x in outputs["cls"]]
        return self.prior_generator(sizes, outputs["cls"][0].device)

    def flat_outputs(self, outputs: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        """Per-level outputs -> ``{"cls": [B, N, K], "reg": [B, N, R], "centerness": [B, N, 1]}``."""
        a = self.head.num_anchors
        flat = {"cls": flatten(outputs["cls"], self.num_classes)}
        flat["reg"] = flatten(outputs["reg"], outputs["reg"][0].shape[1] // a)
        if "centerness" in outputs:
            flat["centerness"] = flatten(outputs["centerness"], 1)
        return flat

    def assign(self, priors: Priors, batch, flat: dict[str, Tensor] | None = None) -> Assignment:
        """The assigner on ``batch``'s targets (``flat``: this batch's flattened predictions,
        ``{"cls", "reg"[, "centerness"]}``, for prediction-aware assigners; None where there are
        none, e.g. ``kdctl analyze-conflict`` without a student checkpoint)."""
        return self.assigner.assign(priors, batch, self.num_classes, flat)

    def loss(self, outputs: dict[str, list[Tensor]], batch, reduce: Callable[[Tensor], Tensor] = lambda t: t,
             assignment: Assignment | None = None) -> dict[str, Tensor]:
        """Named weighted losses of ``outputs`` against the :class:`~kdctl.data.collate.Batch`'s
        targets (resized-image pixels). ``reduce`` all-reduces averaging factors (mean over
        processes) in distributed training; ``assignment``: this batch's, when the caller
        already has it (the distiller shares it with the KD losses)."""
        return self._losses(outputs, batch, reduce, assignment)[0]

    def _losses(self, outputs, batch, reduce, assignment=None) -> tuple[dict[str, Tensor], DenseShared]:
        flat, priors = self.flat_outputs(outputs), self.priors(outputs)
        if assignment is None:
            assignment = self.assign(priors, batch, flat)
        return self.detection_loss(flat, priors, assignment, reduce), DenseShared(flat, priors, assignment)

    def postprocess(self, outputs: dict[str, list[Tensor]], valid_sizes: Tensor, scales: Tensor, *,
                    keep_classes: Tensor | None = None, **kwargs) -> Detections:
        """Raw per-level ``outputs`` -> :class:`Detections` (:func:`~kdctl.models.postprocess.postprocess`).
        ``keep_classes``: bool ``[K]``; the other classes score 0 (below any threshold: they take
        no slot before NMS or the ``max_per_image`` cut)."""
        flat = self.flat_outputs(outputs)
        if keep_classes is not None:
            flat["cls"] = flat["cls"].masked_fill(~keep_classes, float("-inf"))
        return postprocess(self.decoder, flat, self.priors(outputs), valid_sizes, scales, **kwargs)

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        valid_sizes: Tensor,
        scales: Tensor,
        *,
        score_thr: float = 0.05,
        nms_iou: float | None = None,
        topk_pre_nms: int = 1000,
        max_per_image: int = 100,
    ) -> Detections:
        """Detect on normalised ``images`` ``[B, 3, H, W]``; see :func:`postprocess`."""
        return self.postprocess(self(images), valid_sizes, scales, score_thr=score_thr,
                                nms_iou=self.decoder.nms_iou if nms_iou is None else nms_iou,
                                topk_pre_nms=topk_pre_nms, max_per_image=max_per_image)

    @property
    def postprocess_rules(self) -> dict:
        """What an exported file records of how detections are made: ``nms_iou`` (the family's
        default), ``score_rule`` (:data:`~kdctl.models.decoders.SCORE_RULES`) and ``drop_empty``
        (boxes of zero size dropped before NMS)."""
        d = self.decoder
        return {"nms_iou": d.nms_iou, "score_rule": d.score, "drop_empty": d.drop_empty}

    def compiled_parts(self) -> list[nn.Module]:
        """The submodules ``runtime.compile`` compiles (backbone and neck: the head is crossed by
        CrossKD, so it stays eager)."""
        return [self.backbone, self.neck]

    def end_to_end_candidates(self, size: tuple[int, int], *, score_thr: float, topk_pre_nms: int) -> nn.Module:
        """The module the end-to-end export graph runs before its NMS: normalised images of one
        ``size`` -> (boxes, scores, labels, keep) (:class:`~kdctl.models.postprocess.CanvasCandidates`)."""
        return CanvasCandidates(self, size, score_thr=score_thr, topk_pre_nms=topk_pre_nms)

    # ------------------------------------------------------------------ distillation surfaces
    def taps(self, images: Tensor, *, head: bool = True, tower_idx: int | None = None) -> Taps:
        """One forward with its KD surfaces: the neck levels; the raw outputs unless ``head`` is
        False; with ``tower_idx``, each branch's pre-activation tower features there
        (:meth:`DenseHead.forward_with_tower`)."""
        feats = self.features(images)
        if not head:
            return Taps(feats)
        if tower_idx is None:
            return Taps(feats, self.head(feats))
        raw, mid = self.head.forward_with_tower(feats, tower_idx)
        return Taps(feats, raw, mid)

    def detection_losses(self, taps: Taps, batch, reduce: Callable[[Tensor], Tensor] = lambda t: t
                         ) -> tuple[dict[str, Tensor], DenseShared]:
        """:meth:`loss` of ``taps.raw`` and what it computed (flattened outputs, priors and the one
        assignment: :class:`~kdctl.models.contract.DenseShared`) for the KD methods to share."""
        return self._losses(taps.raw, batch, reduce)

    # ------------------------------------------------------------------ export tensor path
    def level_names(self) -> list[str]:
        """``p3 .. p7``: the neck's level names from the strides (P_l has stride 2**l)."""
        return [f"p{int(round(math.log2(s)))}" for s in self.strides]

    def raw_names(self) -> list[str]:
        """Names of :meth:`raw_tuple`'s tensors, branch-major: ``cls_p3 .. cls_p7, reg_p3 .. reg_p7``
        (+ ``centerness_p3 ..`` for FCOS/ATSS)."""
        return [f"{name}_{lvl}" for name in self.head.output_names for lvl in self.level_names()]

    def raw_tuple(self, raw: dict[str, list[Tensor]]) -> tuple[Tensor, ...]:
        """The raw outputs as one flat tuple, in :meth:`raw_names` order."""
        return tuple(t for name in self.head.output_names for t in raw[name])

    def raw_from_tuple(self, outputs) -> dict[str, list[Tensor]]:
        """A flat tuple of :meth:`raw_tuple` outputs (tensors or arrays) -> the raw outputs."""
        n = len(self.strides)
        return {name: [torch.as_tensor(t) for t in outputs[i * n:(i + 1) * n]] for i, name in enumerate(self.head.output_names)}

    # ------------------------------------------------------------------ class rows
    def classifier_keys(self) -> list[str]:
        """State-dict names of the per-class tensors (``head.cls_pred.weight`` / ``.bias``; one
        pair per level for per-level predictors)."""
        owned = {id(t) for t in self.head.cls_pred.parameters()}
        return [name for name, t in self.named_parameters() if id(t) in owned]

    def class_rows(self, classes, num_classes: int | None = None) -> Tensor:
        """int64 rows (dim 0) of every :meth:`classifier_keys` tensor that hold ``classes``
        (indices into K classes; ``num_classes``: K of another checkpoint of this architecture,
        default this detector's), for every anchor, anchor-major: row ``a*K + k``."""
        k = self.num_classes if num_classes is None else num_classes
        return class_rows(classes, k, self.head.num_anchors)

    def keep_classes(self, index) -> None:
        """Keep only classes ``index`` (indices into K, in that order), in place: every classifier
        conv keeps rows :meth:`class_rows` ``(index)`` (nothing drawn from the random generator),
        and K of the detector, its head and its losses becomes ``len(index)``."""
        if list(index) == list(range(self.num_classes)):
            return
        rows, head = self.class_rows(index), self.head
        if isinstance(head.cls_pred, nn.ModuleList):  # per-level predictors (yolo): each level's conv cut
            for level, conv in enumerate(head.cls_pred):
                head.cls_pred[level] = keep_conv_rows(conv, rows)
        else:
            head.cls_pred = keep_conv_rows(head.cls_pred, rows)
        head.num_classes = len(index)  # Detector.num_classes reads the head's
        self.detection_loss.num_classes = len(index)


@dataclass
class FamilyParts:
    """The tensor-free parts a family gives a detector (what ``Criterion`` used to hold)."""

    family: Family
    prior_generator: PriorGenerator
    assigner: Assigner
    decoder: BoxDecoder
    loss: DetectionLoss


def build_parts(cfg, num_classes: int, strides: Sequence[int], head: DenseHead) -> FamilyParts:
    """The prior generator, assigner, box decoder and losses of ``cfg``'s family for a neck with
    ``strides`` and ``head`` (the decoder reads the head's ``reg_max`` / ``norm_on_bbox``)."""
    family = get_family(cfg.head)
    priors = PriorGenerator(strides, family.anchors, family.point_offset, style=cfg.variant.priors)
    decoder = family.build_decoder(cfg, head)
    decoder.drop_empty = cfg.variant.priors != "torchvision"  # see BoxDecoder: each source's own rule
    return FamilyParts(family, priors, family.build_assigner(cfg, decoder), decoder,
                       family.build_loss(cfg, num_classes, decoder))


def build_detector(cfg, num_classes: int | None = None) -> Detector:
    """A randomly initialised :class:`Detector` from a recipe's
    :class:`~kdctl.recipe.DetectorConfig`, through its family's builders.

    ``num_classes`` (from the dataset) is used when ``cfg.num_classes`` is None; when both are
    given they must agree. ``cfg.pretrained`` (backbone weights: a local file or "timm") is
    loaded by the backbone; ``cfg.weights`` is not read here (see
    :func:`kdctl.engine.transfer.build_with_weights`).
    """
    if cfg.num_classes is not None and num_classes is not None and cfg.num_classes != num_classes:
        raise KdctlError(
            f"model num_classes is {cfg.num_classes} but the dataset has {num_classes} classes; "
            "remove model.*.num_classes or make them agree"
        )
    k = cfg.num_classes if cfg.num_classes is not None else num_classes
    if k is None:
        raise KdctlError("the number of classes is unknown: set model.*.num_classes or give a dataset")
    family = get_family(cfg.head)
    v = cfg.variant  # architecture details of published detectors; defaults: mmdet's (recipe.VariantConfig)
    backbone = Backbone(cfg.backbone, pretrained=cfg.pretrained, norm_eval=cfg.norm_eval, frozen_stages=cfg.frozen_stages,
                        style=v.backbone_style, bn_eps=v.bn_eps, mean=v.mean, std=v.std)
    neck = family.build_neck(family, cfg, backbone)
    norm = family.norm if cfg.norm == "auto" else cfg.norm
    head = family.build_head(cfg, k, neck.out_channels, neck.num_outs, norm)
    p = build_parts(cfg, k, neck.strides, head)
    return Detector(backbone, neck, head, p.prior_generator, p.assigner, p.decoder, p.loss, family)
