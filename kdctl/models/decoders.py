"""Box decoders: a head's regression outputs -> boxes, plus the inference score rule and NMS IoU.

A decoder is what :func:`kdctl.models.postprocess.postprocess`, export and the conflict analysis
need of a detector family, and all they need: ``decode(reg, priors, index)`` gives xyxy pixel
boxes, ``score`` says how the inference score is formed, ``nms_iou`` is the family's class-wise
NMS threshold (MMDetection's ``test_cfg``). The losses decode with the same object, so training
and inference can never disagree on what a regression output means.

Score rules (``score``):

- ``"cls"``: ``sigmoid(cls)`` (RetinaNet, GFL);
- ``"centerness"``: ``sigmoid(cls) * sigmoid(centerness)``, thresholded on the cls score first
  (mmdet ``with_score_factor``: FCOS, ATSS);
- ``"sqrt-centerness"``: ``sqrt(sigmoid(cls) * sigmoid(centerness))``, ranked and thresholded as
  a whole (torchvision's FCOS ``postprocess_detections``).
"""
from __future__ import annotations

from torch import Tensor

from kdctl.models.coders import DeltaXYWHCoder, distance2bbox, integral
from kdctl.models.priors import Priors

SCORE_RULES = ("cls", "centerness", "sqrt-centerness")


def gather_priors(t: Tensor, index: Tensor | None) -> Tensor:
    """``t`` ``[N, C]`` (per prior) -> ``[B, n, C]`` at ``index`` (int64 ``[B, n]``), or ``[1, N, C]``."""
    return t[None] if index is None else t[index]


class BoxDecoder:
    """Base: subclasses implement :meth:`decode`.

    Args:
        nms_iou: class-wise NMS IoU threshold of the family (mmdet test_cfg).
        score: one of :data:`SCORE_RULES`.
    """

    def __init__(self, nms_iou: float, score: str = "cls"):
        if score not in SCORE_RULES:
            raise ValueError(f"score must be one of {SCORE_RULES}, got {score!r}")
        self.nms_iou = nms_iou
        self.score = score
        # MMDetection's dense heads drop boxes of zero width or height after clipping, before
        # NMS (``_bbox_post_process`` with ``min_bbox_size=0`` in every test_cfg: keep w > 0 and
        # h > 0). torchvision's RetinaNet and FCOS keep them (their ``postprocess_detections``
        # only clip; ``remove_small_boxes(1e-2)`` is in the R-CNN ROI heads, not these), so the
        # detector builder turns this off for ``variant.priors: torchvision``.
        self.drop_empty = True

    @property
    def uses_centerness(self) -> bool:
        """The inference score reads a ``centerness`` output."""
        return self.score != "cls"

    def decode(self, reg: Tensor, priors: Priors, index: Tensor | None = None) -> Tensor:
        """Boxes (xyxy pixels, ``[B, n, 4]``) from regression outputs ``reg`` ``[B, n, R]``;
        ``index`` (int64 ``[B, n]``) picks the prior of each row, or None when ``n == N``."""
        raise NotImplementedError


class DeltaDecoder(BoxDecoder):
    """``(dx, dy, dw, dh)`` deltas against anchor boxes (RetinaNet, ATSS): :class:`DeltaXYWHCoder`."""

    def __init__(self, coder: DeltaXYWHCoder, nms_iou: float, score: str = "cls"):
        super().__init__(nms_iou, score)
        self.coder = coder

    def decode(self, reg, priors, index=None):
        return self.coder.decode(gather_priors(priors.anchors, index), reg)


class DistributionDecoder(BoxDecoder):
    """GFL: each side is the expectation of a discrete distribution over ``0..reg_max`` bins, in
    strides, measured from the anchor centre (``reg`` ``[B, n, 4 * (reg_max + 1)]``)."""

    def __init__(self, reg_max: int, nms_iou: float, score: str = "cls"):
        super().__init__(nms_iou, score)
        self.reg_max = reg_max

    def decode(self, reg, priors, index=None):
        dist = integral(reg, self.reg_max) * gather_priors(priors.stride[:, None], index)
        return distance2bbox(gather_priors(priors.points, index), dist)


class DistanceDecoder(BoxDecoder):
    """FCOS: ``(l, t, r, b)`` distances from the point, in pixels, or in strides when
    ``norm_on_bbox`` (mmdet's FCOS "tricks" configs, torchvision's FCOS)."""

    def __init__(self, nms_iou: float, score: str = "centerness", norm_on_bbox: bool = False):
        super().__init__(nms_iou, score)
        self.norm_on_bbox = norm_on_bbox

    def decode(self, reg, priors, index=None):
        dist = reg * gather_priors(priors.stride[:, None], index) if self.norm_on_bbox else reg
        return distance2bbox(gather_priors(priors.points, index), dist)
