"""``Detector`` = timm backbone + FPN + dense head, its criterion, and the one postprocess that
evaluation and export share.

- ``detector(images)`` -> raw per-level head outputs (``{"cls": [...], "reg": [...], ...}``);
- ``detector.loss(outputs, batch)`` -> named weighted losses (``loss_cls``, ``loss_bbox``, ...);
- ``detector.predict(images, valid_sizes, scales)`` -> :class:`Detections` in original image
  pixels.

``build_detector(cfg, num_classes)`` wires one from a recipe's ``model.student`` /
``model.teacher`` section; the modules themselves take plain arguments.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from kdctl.errors import KdctlError
from kdctl.models.backbone import Backbone
from kdctl.models.criterion import Criterion, Priors, build_criterion, flatten
from kdctl.models.fpn import FPN, MMDET_EXTRA_CONVS
from kdctl.models.heads import HEADS, DenseHead

__all__ = ["Detector", "Detections", "build_detector", "postprocess"]

FPN_STRIDES = (8, 16, 32, 64, 128)
# mmdet's head norms: GroupNorm(32) towers for FCOS/ATSS/GFL, plain convs for RetinaNet
DEFAULT_NORM = {"retinanet": "none", "fcos": "gn", "atss": "gn", "gfl": "gn"}


@dataclass
class Detections:
    """Detections of a batch, flat (D rows over all images), best first within each image.

    batch_index  int64   [D]     image of the row, in ``[0, B)``
    boxes        float32 [D, 4]  xyxy pixels of the **original** image
    scores       float32 [D]
    labels       int64   [D]     contiguous class index in ``[0, K)``
    """

    batch_index: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def to_coco(self, image_ids: Tensor, cat_ids: list[int]) -> list[dict]:
        """COCO result dicts (``bbox`` as x, y, w, h) with ``image_ids[batch_index]`` and the
        dataset's category ids (``cat_ids[label]``)."""
        xywh = self.boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        ids = image_ids.cpu()[self.batch_index.cpu()].tolist()
        boxes = [[round(v, 3) for v in row] for row in xywh.cpu().tolist()]
        return [
            {"image_id": i, "category_id": cat_ids[c], "bbox": b, "score": round(s, 5)}
            for i, c, b, s in zip(ids, self.labels.cpu().tolist(), boxes, self.scores.cpu().tolist())
        ]


class Detector(nn.Module):
    """A one-stage dense detector.

    Args:
        backbone: a :class:`Backbone` (C3-C5, strides 8/16/32).
        neck: an :class:`FPN` producing P3-P7.
        head: a :class:`DenseHead` over the FPN levels.
        criterion: the head's priors/targets/losses/decoder.
        head_name: "retinanet" | "atss" | "gfl" | "fcos".

    ``mean``/``std`` are the backbone's input normalisation (RGB in [0, 1]).
    """

    def __init__(self, backbone: Backbone, neck: FPN, head: DenseHead, criterion: Criterion, head_name: str):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.criterion = criterion
        self.head_name = head_name
        self.num_classes = head.num_classes
        self.strides = list(FPN_STRIDES[: neck.num_outs])
        self.mean, self.std = backbone.mean, backbone.std

    # ------------------------------------------------------------------ forward
    def features(self, images: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` normalised images -> FPN levels P3-P7 ``[B, C, H_l, W_l]``."""
        return self.neck(self.backbone(images))

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        """Raw per-level head outputs (see :meth:`DenseHead.forward`)."""
        return self.head(self.features(images))

    def priors(self, outputs: dict[str, list[Tensor]]) -> Priors:
        """The priors matching ``outputs`` (by the sizes of its levels)."""
        sizes = [tuple(x.shape[-2:]) for x in outputs["cls"]]
        return self.criterion.priors(sizes, outputs["cls"][0].device)

    def flat_outputs(self, outputs: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        """Per-level outputs -> ``{"cls": [B, N, K], "reg": [B, N, R], "centerness": [B, N, 1]}``."""
        a = self.head.num_anchors
        flat = {"cls": flatten(outputs["cls"], self.num_classes)}
        flat["reg"] = flatten(outputs["reg"], outputs["reg"][0].shape[1] // a)
        if "centerness" in outputs:
            flat["centerness"] = flatten(outputs["centerness"], 1)
        return flat

    def loss(self, outputs: dict[str, list[Tensor]], batch, reduce: Callable[[Tensor], Tensor] = lambda t: t,
             assignment=None) -> dict[str, Tensor]:
        """Named weighted losses of ``outputs`` against the :class:`~kdctl.data.collate.Batch`'s
        targets (resized-image pixels). ``reduce`` all-reduces averaging factors (mean over
        processes) in distributed training."""
        return self.criterion.loss(self.flat_outputs(outputs), self.priors(outputs), batch, reduce, assignment)

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
        outputs = self(images)
        return postprocess(
            self, outputs, valid_sizes, scales, score_thr=score_thr,
            nms_iou=self.criterion.nms_iou if nms_iou is None else nms_iou,
            topk_pre_nms=topk_pre_nms, max_per_image=max_per_image,
        )


def postprocess(
    model: Detector,
    outputs: dict[str, list[Tensor]],
    valid_sizes: Tensor,
    scales: Tensor,
    *,
    score_thr: float,
    nms_iou: float,
    topk_pre_nms: int,
    max_per_image: int,
) -> Detections:
    """Raw outputs -> detections, as mmdet's ``BaseDenseHead.predict_by_feat`` (v3):

    1. per level, the ``topk_pre_nms`` highest (prior, class) sigmoid scores above
       ``score_thr`` (``filter_scores_and_topk``);
    2. decode only those boxes; clip to the image's valid (resized, unpadded) size;
    3. FCOS/ATSS: score *= sigmoid(centerness) (``with_score_factor``); with the criterion's
       ``centerness_score == "sqrt"`` (torchvision's FCOS) the score is instead
       ``sqrt(sigmoid(cls) * sigmoid(centerness))`` from the start, and steps 1-2 rank and
       threshold that score (torchvision ``FCOS.postprocess_detections``);
    4. class-wise NMS at ``nms_iou`` for all images at once (``batched_nms`` with one group per
       (image, class)); keep the best ``max_per_image`` per image;
    5. boxes back to original-image pixels by the batch's ``scales`` (resized / original).

    Args:
        outputs: the detector's raw per-level outputs for B images.
        valid_sizes: int64 ``[B, 2]`` (h, w) after resize, before padding.
        scales: float ``[B, 2]`` (y, x) scale factors resized / original.
    """
    K = model.num_classes
    flat = model.flat_outputs(outputs)
    pri = model.priors(outputs)
    B = flat["cls"].shape[0]
    device = flat["cls"].device
    boxes, scores, labels, kept = [], [], [], []
    start = 0
    fused = model.criterion.uses_centerness and model.criterion.centerness_score == "sqrt"
    for n in pri.num_level_priors:
        cls = flat["cls"][:, start:start + n].float().sigmoid()
        if fused:
            cls = torch.sqrt(cls * flat["centerness"][:, start:start + n].float().sigmoid())
        cls = cls.reshape(B, n * K)
        k = min(topk_pre_nms, n * K)
        top, idx = cls.topk(k, dim=1)  # [B, k]
        prior = idx.div(K, rounding_mode="floor") + start
        lab = idx.remainder(K)
        reg = torch.gather(flat["reg"], 1, prior[..., None].expand(-1, -1, flat["reg"].shape[-1])).float()
        box = model.criterion.decode(reg, pri, prior)
        score = top
        if model.criterion.uses_centerness and not fused:
            ctr = torch.gather(flat["centerness"], 1, prior[..., None]).squeeze(-1).float().sigmoid()
            score = torch.where(top > score_thr, top * ctr, top)  # threshold on cls score first, as mmdet
        keep = top > score_thr
        boxes.append(box)
        scores.append(score)
        labels.append(lab)
        kept.append(keep)
        start += n
    boxes_t = torch.cat(boxes, 1)  # [B, T, 4]
    scores_t, labels_t = torch.cat(scores, 1), torch.cat(labels, 1)
    hw = valid_sizes.to(device=device, dtype=boxes_t.dtype)
    limit = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)[:, None, :]
    boxes_t = torch.minimum(boxes_t.clamp(min=0), limit)
    bidx_t = torch.arange(B, device=device)[:, None].expand_as(labels_t)

    valid = torch.cat(kept, 1)
    b, bx, sc, lb = bidx_t[valid], boxes_t[valid], scores_t[valid], labels_t[valid]
    keep = batched_nms(bx, sc, b * K + lb, nms_iou)  # sorted by score, descending
    b, bx, sc, lb = b[keep], bx[keep], sc[keep], lb[keep]
    # rank of each kept row within its image (rows are already best-first): stable sort by image
    order = torch.sort(b, stable=True).indices
    b, bx, sc, lb = b[order], bx[order], sc[order], lb[order]
    counts = torch.bincount(b, minlength=B)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(b.numel(), device=device) - first[b]
    m = rank < max_per_image
    b, bx, sc, lb = b[m], bx[m], sc[m], lb[m]
    s = scales.to(device=device, dtype=bx.dtype)[b]  # [D, 2] (y, x)
    bx = bx / torch.stack([s[:, 1], s[:, 0], s[:, 1], s[:, 0]], dim=-1)
    return Detections(batch_index=b, boxes=bx, scores=sc, labels=lb)


def build_detector(cfg, num_classes: int | None = None) -> Detector:
    """A :class:`Detector` from a recipe's :class:`~kdctl.recipe.DetectorConfig`.

    ``num_classes`` (from the dataset) is used when ``cfg.num_classes`` is None; when both are
    given they must agree. ``cfg.weights`` (a kdctl checkpoint of the whole detector) is loaded
    last; ``cfg.pretrained`` (backbone weights: a local file or "timm") is loaded by the backbone.
    """
    if cfg.num_classes is not None and num_classes is not None and cfg.num_classes != num_classes:
        raise KdctlError(
            f"model num_classes is {cfg.num_classes} but the dataset has {num_classes} classes; "
            "remove model.*.num_classes or make them agree"
        )
    k = cfg.num_classes if cfg.num_classes is not None else num_classes
    if k is None:
        raise KdctlError("the number of classes is unknown: set model.*.num_classes or give a dataset")
    v = cfg.variant  # architecture details of published detectors; defaults: mmdet's (recipe.VariantConfig)
    backbone = Backbone(cfg.backbone, pretrained=cfg.pretrained, norm_eval=cfg.norm_eval, frozen_stages=cfg.frozen_stages,
                        style=v.backbone_style, bn_eps=v.bn_eps, mean=v.mean, std=v.std)
    extra_from, relu_p7 = MMDET_EXTRA_CONVS[cfg.head]
    extra_from = extra_from if v.p6_from == "auto" else v.p6_from
    relu_p7 = relu_p7 if v.relu_before_p7 is None else v.relu_before_p7
    neck = FPN(backbone.channels, cfg.fpn_channels, extra_from=extra_from, relu_before_p7=relu_p7)
    norm = DEFAULT_NORM[cfg.head] if cfg.norm == "auto" else cfg.norm
    head_extra = {"norm_on_bbox": v.fcos_norm_on_bbox, "centerness_on_reg": v.fcos_centerness_on_reg} if cfg.head == "fcos" else {}
    head = HEADS[cfg.head](k, cfg.fpn_channels, cfg.feat_channels, cfg.stacked_convs, norm=norm, num_levels=neck.num_outs,
                           conv_bias=v.head_conv_bias, **head_extra)
    extra = {"reg_max": head.reg_max} if cfg.head == "gfl" else {}
    if cfg.head == "fcos":
        extra["norm_on_bbox"] = head.norm_on_bbox
    criterion = build_criterion(cfg.head, k, FPN_STRIDES[: neck.num_outs], cfg.box_loss, prior_style=v.priors,
                                centerness_score=v.centerness_score, **extra)
    model = Detector(backbone, neck, head, criterion, cfg.head)
    if cfg.weights:
        from kdctl.engine.checkpoint import load_checkpoint_weights, load_model_weights

        state, _ = load_checkpoint_weights(cfg.weights)
        load_model_weights(model, state, str(cfg.weights))
    return model
