"""Label assignment for dense detectors: max-IoU (RetinaNet), ATSS (ATSS, GFL), FCOS.

Every assigner is a plain ``@torch.no_grad`` callable on a padded batch and returns an
:class:`Assignment`. Its :meth:`assign` method is the one interface a detector calls:
``assign(priors, batch, num_classes, preds=None)`` with the :class:`~kdctl.models.priors.Priors`,
the :class:`~kdctl.data.collate.Batch` (its GTs and ignore regions) and the flattened predictions
(``{"cls": [B, N, K], "reg": [B, N, R]}`` (+ ``"centerness"``), or None where there are none),
which the assigners here do not read but a task-aligned assigner (TOOD) does: such an assigner
is built with the family's box decoder (``Family.build_assigner(cfg, decoder)``) to decode the
predicted boxes itself. Nothing loops over images or ground truths in Python; the work is a few
``[B, A, G]`` tensors (B images, A priors, G padded GTs), about ``B * A * G * 4`` bytes each.

Inputs shared by all assigners (pixels, xyxy, the layout of :class:`kdctl.data.collate.Batch`):

    gt_boxes     float [B, G, 4]   zeros at padding
    gt_labels    int64 [B, G]      class in [0, K), -1 at padding
    gt_mask      bool  [B, G]      True for real boxes; padded GTs are never assigned
    num_classes  int               K, the label written for background
    ignore       float [B, M, 4]   optional ignore (crowd / difficult) regions
    ignore_mask  bool  [B, M]      True for real regions

Ignore rule (one rule for all assigners, detectron2/mmdet style): a prior that is **not
positive** and whose IoF (intersection over the prior's own area) with some ignore region is
``>= ignore_iof_thr`` (default 0.5; negative disables) is labelled -1. For point priors (FCOS)
the IoF of a point is 1 inside a region and 0 outside, so points strictly inside an ignore
region are ignored. (mmdet differs in detail: it disables ignoring by default, uses ``>``, and
removes ignored priors from matching before it starts; here a positive always stays positive.)

Reference: MMDetection's ``MaxIoUAssigner``, ``ATSSAssigner`` (mmdet/models/task_modules/
assigners/) and ``FCOSHead._get_targets_single`` (mmdet/models/dense_heads/fcos_head.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kdctl.models.priors import Priors

__all__ = [
    "Assignment",
    "Assigner",
    "MaxIoUAssigner",
    "ATSSAssigner",
    "FCOSAssigner",
    "pairwise_iou",
    "pairwise_iof",
]

# Degenerate unions/areas are clamped to this (mmdet's BboxOverlaps2D eps).
_EPS = 1e-6


@dataclass
class Assignment:
    """Result of an assigner, one row per prior (detectron2 label convention).

    labels     int64 [B, A]     class index in ``[0, K)`` for positives, ``K`` (num_classes)
                                for background, -1 for ignored priors (no loss of any kind)
    gt_index   int64 [B, A]     index into the image's G GTs for positives, -1 otherwise
    boxes      float [B, A, 4]  matched GT box, xyxy pixels; zeros where not positive
    pos_mask   bool  [B, A]     ``labels`` in ``[0, K)``
    num_pos    int64 []         number of positives in the batch (a 0-dim tensor, no host sync)

    Regression targets are left to :mod:`kdctl.models.coders`: ``DeltaXYWHCoder.encode(anchors,
    a.boxes)`` for RetinaNet/ATSS, ``bbox2distance(points, a.boxes)`` for FCOS's ``ltrb``.
    """

    labels: Tensor
    gt_index: Tensor
    boxes: Tensor
    pos_mask: Tensor
    num_pos: Tensor


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every box of ``boxes1`` with every box of ``boxes2``, batched by broadcasting.

    Args:
        boxes1: ``[..., N, 4]`` xyxy pixels (e.g. priors ``[A, 4]``).
        boxes2: ``[..., M, 4]`` xyxy pixels (e.g. GTs ``[B, G, 4]``).

    Returns:
        ``[..., N, M]`` IoU (``[B, A, G]`` in the example); the union is clamped to 1e-6 as in
        mmdet, so degenerate boxes give 0, not NaN.
    """
    inter, area1, area2 = _intersection(boxes1, boxes2)
    union = (area1[..., :, None] + area2[..., None, :]).sub_(inter).clamp_(min=_EPS)
    return inter.div_(union)


def pairwise_iof(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over the area of ``boxes1`` (``[..., N, 4]``) for every pair with ``boxes2``
    (``[..., M, 4]``). Returns ``[..., N, M]``."""
    inter, area1, _ = _intersection(boxes1, boxes2)
    return inter.div_(area1[..., :, None].clamp(min=_EPS))


def _intersection(b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b1, b2 = b1.float(), b2.float()
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    # One coordinate at a time keeps the peak at a few [..., N, M] tensors, not [..., N, M, 2].
    w = torch.minimum(b1[..., :, None, 2], b2[..., None, :, 2])
    w.sub_(torch.maximum(b1[..., :, None, 0], b2[..., None, :, 0])).clamp_(min=0)
    h = torch.minimum(b1[..., :, None, 3], b2[..., None, :, 3])
    h.sub_(torch.maximum(b1[..., :, None, 1], b2[..., None, :, 1])).clamp_(min=0)
    return w.mul_(h), area1, area2


def _ignored(
    priors: Tensor, ignore: Tensor | None, ignore_mask: Tensor | None, thr: float
) -> Tensor | None:
    """bool ``[B, A]``: prior has IoF >= thr with a real ignore region (points: inside one)."""
    if ignore is None or thr < 0 or ignore.shape[1] == 0:
        return None
    ignore = ignore.float()
    if ignore_mask is None:
        ignore_mask = torch.ones(ignore.shape[:2], dtype=torch.bool, device=ignore.device)
    if priors.shape[-1] == 2:  # points: IoF is 1 strictly inside, 0 outside
        x, y = priors[None, :, None, 0], priors[None, :, None, 1]
        reg = ignore[:, None, :, :]
        hit = (x > reg[..., 0]) & (x < reg[..., 2]) & (y > reg[..., 1]) & (y < reg[..., 3])
        hit = hit & (thr <= 1.0)
    else:
        hit = pairwise_iof(priors, ignore) >= thr  # [B, A, M]
    return (hit & ignore_mask[:, None, :]).any(dim=-1)


def _and(mask: Tensor, valid: Tensor | None) -> Tensor:
    return mask if valid is None else mask & valid


def _assignment(
    matched: Tensor,
    negative: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    ignored: Tensor | None,
) -> Assignment:
    """Build the :class:`Assignment` from ``matched`` (int64 ``[B, A]`` GT index, -1 none) and
    ``negative`` (bool ``[B, A]``, background unless matched); the rest is -1 (ignore)."""
    pos = matched >= 0
    idx = matched.clamp(min=0)
    cls = torch.gather(gt_labels, 1, idx) if gt_labels.shape[1] else torch.zeros_like(idx)
    labels = torch.where(pos, cls, torch.where(negative, num_classes, -1))
    if ignored is not None:
        labels = labels.masked_fill(ignored & ~pos, -1)
    if gt_boxes.shape[1]:
        boxes = torch.gather(gt_boxes.float(), 1, idx[..., None].expand(-1, -1, 4))
        boxes = boxes * pos[..., None]
    else:
        boxes = gt_boxes.new_zeros(matched.shape + (4,), dtype=torch.float32)
    return Assignment(
        labels=labels,
        gt_index=torch.where(pos, matched, -1),
        boxes=boxes,
        pos_mask=pos,
        num_pos=pos.sum(),
    )


class Assigner:
    """Base of the assigners: :meth:`assign` passes the prior fields the subclass's ``__call__``
    needs (anchors or points, and :meth:`prior_fields`' extras)."""

    uses_anchors: bool = True  # match anchor boxes (else the points)
    # priors outside each image's own padded extent take no part (Priors.valid_flags): the
    # anchor heads' valid/inside flags in MMDetection; its point heads (FCOS) have none
    exclude_padding: bool = False

    def prior_fields(self, priors: Priors) -> dict:
        """Extra keyword arguments of ``__call__`` taken from the priors."""
        return {}

    def assign(self, priors: Priors, batch, num_classes: int, preds: dict[str, Tensor] | None = None) -> Assignment:
        """The assignment ``[B, N]`` of ``priors`` against ``batch``'s GTs and ignore regions;
        ``preds`` (the flattened predictions, or None) is for prediction-aware assigners."""
        where = priors.anchors if self.uses_anchors and priors.anchors is not None else priors.points
        extra = self.prior_fields(priors)
        if self.exclude_padding:
            extra["valid"] = priors.valid_flags(batch.pad_sizes)
        return self(where, batch.boxes, batch.labels, batch.gt_mask, num_classes=num_classes, ignore=batch.ignore,
                    ignore_mask=batch.ignore_mask, **extra)


class MaxIoUAssigner(Assigner):
    """RetinaNet's assigner, mmdet ``MaxIoUAssigner`` semantics (``gt_max_assign_all=True``).

    With ``iou [B, A, G]`` between priors and real GTs, in this order (later steps override):

    1. every prior starts ignored (-1);
    2. background if its best IoU is in ``[0, neg_iou_thr)`` (or ``[lo, hi)`` for a tuple);
       an image without GTs is all background;
    3. positive, matched to its best GT, if its best IoU ``>= pos_iou_thr``;
    4. if ``match_low_quality``: for every GT whose best IoU over all priors is
       ``>= min_pos_iou``, **every** prior reaching that best IoU (ties included) becomes
       positive for that GT; when one prior is the best of several GTs the GT with the highest
       index wins (mmdet's loop order).

    RetinaNet: ``pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0`` (the defaults). As in
    mmdet, ``min_pos_iou=0`` lets a GT that overlaps no prior at all match every prior with
    IoU 0; the datasets drop zero-area boxes so this does not happen with real GTs.
    """

    def __init__(
        self,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float | tuple[float, float] = 0.4,
        min_pos_iou: float = 0.0,
        match_low_quality: bool = True,
        ignore_iof_thr: float = 0.5,
        exclude_padding: bool = True,
    ) -> None:
        self.exclude_padding = exclude_padding
        self.pos_iou_thr = pos_iou_thr
        if isinstance(neg_iou_thr, (int, float)):
            neg_iou_thr = (0.0, float(neg_iou_thr))
        self.neg_range = tuple(neg_iou_thr)
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality
        self.ignore_iof_thr = ignore_iof_thr

    @torch.no_grad()
    def __call__(
        self,
        priors: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        *,
        num_classes: int,
        ignore: Tensor | None = None,
        ignore_mask: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Assignment:
        """Assign ``priors`` (float ``[A, 4]`` xyxy anchors) to the GTs of each image (inputs in
        the module docstring). ``valid`` (bool ``[B, A]``, optional): priors outside it are
        neither matched nor background (label -1, no loss), as mmdet assigns only the inside
        anchors. Returns an :class:`Assignment` ``[B, A]``."""
        B, G = gt_labels.shape
        A = priors.shape[0]
        ignored = _ignored(priors.float(), ignore, ignore_mask, self.ignore_iof_thr)
        if G == 0:
            matched = torch.full((B, A), -1, dtype=torch.int64, device=priors.device)
            return _assignment(matched, _and(matched < 0, valid), gt_boxes, gt_labels, num_classes, ignored)

        iou = pairwise_iou(priors, gt_boxes)  # [B, A, G]
        iou.masked_fill_(~gt_mask[:, None, :], -1.0)  # padding below any real IoU (>= 0)
        if valid is not None:
            iou.masked_fill_(~valid[..., None], -1.0)  # never anyone's best, never a GT's best
        max_iou, argmax = iou.max(dim=-1)  # [B, A]
        max_iou.clamp_(min=0)  # no real GT: best IoU 0, i.e. background, as mmdet
        lo, hi = self.neg_range
        negative = (max_iou >= lo) & (max_iou < hi)
        matched = torch.where(max_iou >= self.pos_iou_thr, argmax, -1)
        if self.match_low_quality:
            gt_max = iou.amax(dim=1, keepdim=True)  # [B, 1, G]
            ok = gt_mask[:, None, :] & (gt_max >= self.min_pos_iou)
            best = (iou == gt_max) & ok  # [B, A, G]
            # highest GT index among the GTs this prior is best for: first hit of the reversed row
            last = G - 1 - best.flip(-1).to(torch.uint8).argmax(dim=-1)
            matched = torch.where(best.any(dim=-1), last, matched)
        negative &= matched < 0
        return _assignment(matched, _and(negative, valid), gt_boxes, gt_labels, num_classes, ignored)


class ATSSAssigner(Assigner):
    """Adaptive Training Sample Selection (Zhang et al., CVPR 2020), mmdet ``ATSSAssigner``.

    For every real GT:

    1. candidates: on each level, the ``min(topk, priors on the level)`` priors whose centres are
       closest (L2) to the GT centre;
    2. threshold ``mean + std`` of the candidates' IoUs with the GT, ``std`` unbiased
       (``Tensor.std``, as mmdet);
    3. a candidate is positive if its IoU ``>= threshold`` and its centre is inside the GT by
       more than 0.01 px on all four sides (mmdet's ``min(l, t, r, b) > 0.01``);
    4. a prior positive for several GTs takes the one with the highest IoU (lowest index on
       ties). Everything else is background.

    Priors are anchors ``[A, 4]`` (ATSS/GFL: one 8*stride square per location, centred at
    ``x * stride``); ``num_level_priors`` gives the priors per level, in order.
    """

    def __init__(self, topk: int = 9, ignore_iof_thr: float = 0.5, exclude_padding: bool = True) -> None:
        self.exclude_padding = exclude_padding
        self.topk = topk
        self.ignore_iof_thr = ignore_iof_thr

    def prior_fields(self, priors: Priors) -> dict:
        return {"num_level_priors": priors.num_level_priors}

    @torch.no_grad()
    def __call__(
        self,
        priors: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        *,
        num_classes: int,
        num_level_priors: Sequence[int],
        ignore: Tensor | None = None,
        ignore_mask: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Assignment:
        """Assign ``priors`` (float ``[A, 4]`` xyxy) to the GTs of each image (inputs in the
        module docstring); ``sum(num_level_priors) == A``. ``valid`` (bool ``[B, A]``,
        optional): only those priors are candidates, and the rest get label -1 (no loss), as
        mmdet's ATSS/GFL heads assign only the inside anchors (a level then offers
        ``min(topk, valid priors on it)`` candidates). Returns an :class:`Assignment`."""
        priors = priors.float()
        B, G = gt_labels.shape
        A = priors.shape[0]
        if sum(num_level_priors) != A:
            raise ValueError(f"num_level_priors sums to {sum(num_level_priors)}, priors has {A}")
        ignored = _ignored(priors, ignore, ignore_mask, self.ignore_iof_thr)
        matched = torch.full((B, A), -1, dtype=torch.int64, device=priors.device)
        if G == 0:
            return _assignment(matched, _and(matched < 0, valid), gt_boxes, gt_labels, num_classes, ignored)

        gt_boxes = gt_boxes.float()
        iou = pairwise_iou(priors, gt_boxes)  # [B, A, G]
        centres = (priors[:, :2] + priors[:, 2:]) * 0.5  # [A, 2]
        gt_centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) * 0.5  # [B, G, 2]
        dx = centres[None, :, None, 0] - gt_centres[:, None, :, 0]
        dy = centres[None, :, None, 1] - gt_centres[:, None, :, 1]
        dist = dx.square_().add_(dy.square_()).sqrt_()  # [B, A, G]
        if valid is not None:
            dist.masked_fill_(~valid[..., None], math.inf)  # chosen only where a level has < topk valid

        candidates, start = [], 0
        for n in num_level_priors:
            k = min(self.topk, n)
            if k > 0:
                _, idx = dist[:, start:start + n].topk(k, dim=1, largest=False)
                candidates.append(idx + start)
            start += n
        cand = torch.cat(candidates, dim=1)  # [B, K, G] prior indices
        cand_iou = torch.gather(iou, 1, cand)  # [B, K, G]
        thr = cand_iou.mean(dim=1, keepdim=True) + cand_iou.std(dim=1, keepdim=True)
        cand_ok = None
        if valid is not None:
            cand_ok = torch.gather(valid, 1, cand.flatten(1)).view_as(cand)  # [B, K, G]
            # mean + unbiased std over the valid candidates only; columns whose candidates are
            # all valid keep the plain reduction above (bit-identical when nothing is padded)
            n = cand_ok.sum(dim=1, keepdim=True).float()
            mean = (cand_iou * cand_ok).sum(dim=1, keepdim=True) / n
            var = ((cand_iou - mean).square() * cand_ok).sum(dim=1, keepdim=True) / (n - 1)
            thr = torch.where(cand_ok.all(dim=1, keepdim=True), thr, mean + var.sqrt())

        cx = centres[:, 0][cand]  # [B, K, G]
        cy = centres[:, 1][cand]
        g = gt_boxes[:, None, :, :]  # [B, 1, G, 4]
        inside = torch.stack([cx - g[..., 0], cy - g[..., 1], g[..., 2] - cx, g[..., 3] - cy])
        is_pos = (cand_iou >= thr) & (inside.amin(dim=0) > 0.01) & gt_mask[:, None, :]
        if cand_ok is not None:
            is_pos &= cand_ok

        # Scatter the positive candidates' IoUs back to [B, A, G]; -inf elsewhere. Candidate
        # indices are distinct per (image, GT), since levels are disjoint and topk is distinct.
        score = torch.full_like(iou, -math.inf)
        score.scatter_(1, cand, torch.where(is_pos, cand_iou, -math.inf))
        best, best_gt = score.max(dim=-1)  # [B, A]
        matched = torch.where(best > -math.inf, best_gt, matched)
        return _assignment(matched, _and(matched < 0, valid), gt_boxes, gt_labels, num_classes, ignored)


class FCOSAssigner(Assigner):
    """FCOS targets (Tian et al., ICCV 2019) as mmdet's ``FCOSHead._get_targets_single``.

    A point ``p`` of level ``l`` (stride ``s``) is a candidate for a GT when both hold:

    * inside: without centre sampling, ``min(l, t, r, b) > 0`` to the GT's sides; with centre
      sampling, strictly inside the centre region ``[cx - r*s, cx + r*s] x [cy - r*s, cy + r*s]``
      (``r = center_sample_radius``) clipped to the GT box;
    * scale: ``lo_l <= max(l, t, r, b) <= hi_l`` (both ends inclusive, as mmdet) for the level's
      ``regress_ranges[l]``.

    Among candidate GTs the one with the smallest area wins (lowest index on ties); points
    with none are background. Defaults are mmdet's FCOS with the usual ``center_sampling=True``
    (mmdet's class default is False; its ``fcos_center-normbbox-centeronreg-giou`` configs and
    the FCOS paper's improved recipe turn it on).

    ``points`` must be at the cell centres, ``grid_points(..., offset=0.5)``. The ``ltrb``
    regression target is ``coders.bbox2distance(points, assignment.boxes)`` (divide by the
    stride for ``norm_on_bbox``).
    """

    def __init__(
        self,
        regress_ranges: Sequence[tuple[float, float]] = (
            (-1, 64), (64, 128), (128, 256), (256, 512), (512, math.inf)
        ),
        center_sampling: bool = True,
        center_sample_radius: float = 1.5,
        ignore_iof_thr: float = 0.5,
    ) -> None:
        self.regress_ranges = tuple((float(lo), float(hi)) for lo, hi in regress_ranges)
        self.center_sampling = center_sampling
        self.center_sample_radius = center_sample_radius
        self.ignore_iof_thr = ignore_iof_thr

    uses_anchors = False

    def prior_fields(self, priors: Priors) -> dict:
        return {"stride": priors.stride, "level": priors.level}

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        *,
        num_classes: int,
        stride: Tensor,
        level: Tensor,
        ignore: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Assignment:
        """Assign ``points`` (float ``[A, 2]`` xy pixels) with their ``stride`` (float ``[A]``
        pixels) and ``level`` (int64 ``[A]``, indexes ``regress_ranges``), as returned by
        :func:`~kdctl.models.priors.grid_points` (``level`` must be ``< len(regress_ranges)``).
        Other inputs in the module docstring."""
        points = points.float()
        B, G = gt_labels.shape
        A = points.shape[0]
        ignored = _ignored(points, ignore, ignore_mask, self.ignore_iof_thr)
        matched = torch.full((B, A), -1, dtype=torch.int64, device=points.device)
        if G == 0:
            return _assignment(matched, matched < 0, gt_boxes, gt_labels, num_classes, ignored)

        g = gt_boxes.float()[:, None, :, :]  # [B, 1, G, 4]
        x = points[None, :, None, 0]  # [1, A, 1]
        y = points[None, :, None, 1]
        left, top = x - g[..., 0], y - g[..., 1]  # [B, A, G] each
        right, bottom = g[..., 2] - x, g[..., 3] - y
        max_dist = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))

        if self.center_sampling:
            r = (stride.float() * self.center_sample_radius)[None, :, None]  # [1, A, 1]
            cx = (g[..., 0] + g[..., 2]) * 0.5  # [B, 1, G]
            cy = (g[..., 1] + g[..., 3]) * 0.5
            x1 = torch.maximum(cx - r, g[..., 0])
            y1 = torch.maximum(cy - r, g[..., 1])
            x2 = torch.minimum(cx + r, g[..., 2])
            y2 = torch.minimum(cy + r, g[..., 3])
            inside = (x > x1) & (x < x2) & (y > y1) & (y < y2)
        else:
            inside = (left > 0) & (top > 0) & (right > 0) & (bottom > 0)

        ranges = torch.tensor(self.regress_ranges, dtype=torch.float32, device=points.device)
        lo, hi = ranges[level, 0][None, :, None], ranges[level, 1][None, :, None]
        ok = inside & (max_dist >= lo) & (max_dist <= hi) & gt_mask[:, None, :]

        area = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])  # [B, 1, G]
        area = torch.where(ok, area, math.inf)  # [B, A, G]
        min_area, arg = area.min(dim=-1)
        matched = torch.where(min_area < math.inf, arg, matched)
        return _assignment(matched, matched < 0, gt_boxes, gt_labels, num_classes, ignored)
