"""Box coding shared by all heads: deltas against anchors, distances from points, GFL integral.

Boxes are xyxy pixels; distances are ``(left, top, right, bottom)`` pixels (or stride units
when the caller divides by the stride first, as GFL does). Every function is batched over any
leading dimensions with broadcasting: ``[A, 4]`` anchors against ``[B, A, 4]`` boxes works.

Reference: MMDetection's ``DeltaXYWHBBoxCoder`` and ``DistancePointBBoxCoder``
(mmdet/models/task_modules/coders/) and GFL's ``Integral`` (mmdet/models/dense_heads/gfl_head.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DeltaXYWHCoder",
    "RETINANET_STDS",
    "ATSS_STDS",
    "distance2bbox",
    "bbox2distance",
    "integral",
    "clip_boxes",
]

# target_stds of the mmdet reference configs (target_means are 0 in both):
#   configs/_base_/models/retinanet_r50_fpn.py  -> (1.0, 1.0, 1.0, 1.0)  (also the class default)
#   configs/atss/atss_r50_fpn_1x_coco.py        -> (0.1, 0.1, 0.2, 0.2)
# GFL and FCOS regress distances (DistancePointBBoxCoder) and use no deltas.
RETINANET_STDS = (1.0, 1.0, 1.0, 1.0)
ATSS_STDS = (0.1, 0.1, 0.2, 0.2)

MaxShape = tuple[int, int] | Sequence[int] | Tensor | None


def clip_boxes(boxes: Tensor, max_shape: MaxShape) -> Tensor:
    """Clamp xyxy boxes to ``[0, W] x [0, H]``.

    Args:
        boxes: ``[..., 4]`` xyxy pixels.
        max_shape: ``(H, W)`` for all boxes, or a tensor ``[B, 2]`` of per-image ``(h, w)``
            (e.g. ``Batch.valid_sizes``) when ``boxes`` is ``[B, ..., 4]``; ``None`` returns
            ``boxes`` unchanged.

    Returns:
        ``[..., 4]`` clipped boxes (a new tensor).
    """
    if max_shape is None:
        return boxes
    if not isinstance(max_shape, Tensor):
        h, w = max_shape[0], max_shape[1]
        x = boxes[..., 0::2].clamp(0, w)
        y = boxes[..., 1::2].clamp(0, h)
        return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
    wh = max_shape[..., :2].to(boxes.dtype).flip(-1)  # [B, 2] as (w, h)
    limit = torch.cat([wh, wh], dim=-1)  # [B, 4] as (w, h, w, h)
    limit = limit.reshape(limit.shape[:-1] + (1,) * (boxes.dim() - limit.dim()) + (4,))
    return torch.minimum(boxes.clamp(min=0), limit)


class DeltaXYWHCoder:
    """R-CNN style ``(dx, dy, dw, dh)`` deltas of boxes against anchors, as mmdet's
    ``DeltaXYWHBBoxCoder`` (no center clamp, i.e. ``add_ctr_clamp=False``).

    ``encode``: ``dx = (gx - px) / pw``, ``dw = log(gw / pw)`` (same for y/h), then
    ``(d - means) / stds``. ``decode`` inverts it, clamping ``dw, dh`` to
    ``±|log(wh_ratio_clip)|`` (≈ ±4.135 for 16/1000) before ``exp``.

    Defaults are mmdet's class defaults: means 0, stds 1, which is what RetinaNet uses
    (:data:`RETINANET_STDS`). ATSS uses stds ``(0.1, 0.1, 0.2, 0.2)`` (:data:`ATSS_STDS`).

    ``clamp_below=False`` clamps ``dw, dh`` from above only, as torchvision's ``BoxCoder``
    (``torch.clamp(dw, max=bbox_xform_clip)`` with the same ``log(1000 / 16)``).

    One deviation: ``encode`` clamps the target width/height to ``>= 1e-6`` px, so the zero
    boxes that :class:`~kdctl.models.assigners.Assignment` puts at non-positive priors encode to
    finite (meaningless) deltas instead of ``-inf``; a loss that weights them by 0 then stays
    finite. Real boxes are never that small, so real targets are unchanged.
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = RETINANET_STDS,
        wh_ratio_clip: float = 16 / 1000,
        clamp_below: bool = True,
    ) -> None:
        self.clamp_below = clamp_below
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, anchors: Tensor, gt: Tensor) -> Tensor:
        """Deltas that move ``anchors`` onto ``gt``.

        Args:
            anchors: ``[..., 4]`` xyxy pixels (broadcastable against ``gt``).
            gt: ``[..., 4]`` xyxy pixels.

        Returns:
            float32 ``[..., 4]`` normalised ``(dx, dy, dw, dh)``.
        """
        anchors, gt = anchors.float(), gt.float()
        pxy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
        pwh = anchors[..., 2:] - anchors[..., :2]
        gxy = (gt[..., :2] + gt[..., 2:]) * 0.5
        gwh = (gt[..., 2:] - gt[..., :2]).clamp(min=1e-6)
        deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
        means = deltas.new_tensor(self.means)
        stds = deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(self, anchors: Tensor, deltas: Tensor, max_shape: MaxShape = None) -> Tensor:
        """Boxes from anchors and predicted deltas.

        Args:
            anchors: ``[..., 4]`` xyxy pixels (broadcastable against ``deltas``).
            deltas: ``[..., 4]`` normalised ``(dx, dy, dw, dh)``.
            max_shape: if given, clip the boxes to the image as :func:`clip_boxes` (mmdet
                ``clip_border=True``); ``(H, W)`` or per-image tensor ``[B, 2]``.

        Returns:
            ``[..., 4]`` xyxy pixels, dtype of ``deltas`` promoted with ``anchors``.
        """
        d = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        pxy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
        pwh = anchors[..., 2:] - anchors[..., :2]
        dwh = d[..., 2:].clamp(min=-self.max_ratio if self.clamp_below else None, max=self.max_ratio)
        gxy = pxy + pwh * d[..., :2]
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        return clip_boxes(boxes, max_shape)


def distance2bbox(points: Tensor, dist: Tensor, max_shape: MaxShape = None) -> Tensor:
    """Boxes from points and ``(l, t, r, b)`` distances (FCOS, GFL decode).

    Args:
        points: ``[..., 2]`` xy pixels (broadcastable against ``dist``).
        dist: ``[..., 4]`` ``(left, top, right, bottom)`` pixels.
        max_shape: optional clip, as :func:`clip_boxes`.

    Returns:
        ``[..., 4]`` xyxy pixels: ``(x - l, y - t, x + r, y + b)``.
    """
    boxes = torch.cat([points - dist[..., :2], points + dist[..., 2:]], dim=-1)
    return clip_boxes(boxes, max_shape)


def bbox2distance(
    points: Tensor, boxes: Tensor, max_dist: float | None = None, eps: float = 0.1
) -> Tensor:
    """``(l, t, r, b)`` distances from points to the sides of boxes (FCOS, GFL encode).

    Args:
        points: ``[..., 2]`` xy (broadcastable against ``boxes``).
        boxes: ``[..., 4]`` xyxy, same unit as ``points``.
        max_dist: if given, clamp each distance to ``[0, max_dist - eps]``. GFL passes
            ``reg_max`` with points and boxes divided by the stride, so DFL targets stay strictly
            below the last bin.
        eps: margin below ``max_dist``. 0.1 is mmdet's default
            (``DistancePointBBoxCoder.encode`` / ``bbox2distance``), which GFLHead uses.

    Returns:
        ``[..., 4]`` ``(left, top, right, bottom)``, float dtype of the inputs.
    """
    lt = points - boxes[..., :2]
    rb = boxes[..., 2:] - points
    dist = torch.cat([lt, rb], dim=-1)
    if max_dist is not None:
        dist = dist.clamp(min=0, max=max_dist - eps)
    return dist


def integral(dist_logits: Tensor, reg_max: int = 16) -> Tensor:
    """Expected distance of GFL's discretised distribution (GFL's ``Integral``).

    Args:
        dist_logits: ``[..., 4 * (reg_max + 1)]`` logits, side-major: the ``reg_max + 1``
            bins of ``left`` first, then ``top``, ``right``, ``bottom``.
        reg_max: largest bin value (16 in GFL).

    Returns:
        ``[..., 4]`` ``sum_i i * softmax(logits)_i`` per side, in bin units (stride units in
        GFL; multiply by the stride for pixels).
    """
    n = reg_max + 1
    if dist_logits.shape[-1] != 4 * n:
        raise ValueError(
            f"integral: last dim is {dist_logits.shape[-1]}, expected 4 * (reg_max + 1) = {4 * n}"
        )
    prob = F.softmax(dist_logits.unflatten(-1, (4, n)), dim=-1)
    project = torch.arange(n, dtype=prob.dtype, device=prob.device)
    return prob @ project
