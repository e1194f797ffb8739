"""The end-to-end ONNX graph: uint8 images in, final detections out, NMS inside.

Graph (``kdctl export CKPT --format onnx --end-to-end``)::

    images          uint8   [B, 3, H, W]   letterboxed to the export size H x W (see below)
    -> (x - 255 * mean) / (255 * std)      as kdctl.data.transforms.ToFloatNormalize
    -> detector -> per-level raw outputs   the tensor path of kdctl.export.source.TensorPath
    -> candidates                          the detector's end_to_end_candidates: for a dense
                                           one, per level the topk_pre_nms best (prior, class)
                                           scores, decode, clip to [0, W] x [0, H], score rule,
                                           score threshold, boxes of zero width or height
                                           dropped with decoder.drop_empty
                                           (:func:`kdctl.models.postprocess.candidates`)
    -> class-wise NonMaxSuppression        ONNX op, one class row per class (see below)
    -> the max_det best per image
    boxes           float32 [B, max_det, 4]  xyxy, input (letterboxed) pixels
    scores          float32 [B, max_det]     best first; 0 past num_detections
    labels          int64   [B, max_det]     class index (metadata ``classes``); -1 past num_detections
    num_detections  int64   [B]

The batch dimension is symbolic (any B). H and W are fixed at export.

Candidates are :func:`kdctl.models.postprocess.postprocess` steps 1-3 (the same function,
:func:`~kdctl.models.postprocess.candidates`) on the whole input canvas, and NMS + top-``max_det``
is its step 4, so the graph's rows are the rows of
``postprocess(..., valid_sizes=[H, W], scales=1)`` (the verification checks it). The graph sees
no valid extent of a letterboxed image: the runner (:mod:`kdctl.export.model_file`) applies one
final step for every kind of model file: clip to the image's valid extent, drop boxes left
empty, divide by the resize scale (:func:`kdctl.export.model_file.finalize`).

Class-wise NMS uses ``NonMaxSuppression``'s class dimension: ``scores [B, K, T]`` holds every
candidate's score in its own class row and -1 (below the ``score_threshold`` of -0.5) in the
others. Why not the usual coordinate-offset trick (all boxes shifted by ``label * (max + 1)``,
one class): adding a large offset rounds the coordinates in float32 (at 640 px and 80 classes
the offset reaches ~5e4, where float32 steps are 4e-3 px), so IoUs near the threshold can come
out on the other side of it; the class dimension compares the boxes as they are. Its cost, K x T
scores per image (80 x 5000 at COCO size), is small beside the detector. Per class at most
``max_det`` boxes are kept: no more than ``max_det`` of one class can be among the best
``max_det`` of the image, so this cap changes nothing.

Reference: ONNX operator ``NonMaxSuppression`` (opset 11+, onnx.ai/onnx/operators): boxes that
overlap a better box by IoU > ``iou_threshold`` are removed, per (batch, class), as
``torchvision.ops.nms``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdctl.data.transforms import normalization
from kdctl.models.contract import MetaArchitecture

OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]


# ============================================================================= the NMS op
@torch.library.custom_op("kdctl::nms_classwise", mutates_args=())
def nms_classwise(boxes: Tensor, scores: Tensor, max_per_class: int, iou: float, score_threshold: float) -> Tensor:
    """ONNX ``NonMaxSuppression`` semantics in PyTorch (what the exported node does).

    boxes float32 ``[B, T, 4]`` xyxy; scores float32 ``[B, K, T]``. Returns int64 ``[S, 3]``
    rows ``(batch, class, box)`` of the kept boxes: per (batch, class) the boxes with score >
    ``score_threshold``, NMS at ``iou``, best first, at most ``max_per_class``."""
    from torchvision.ops import batched_nms

    B, K, T = scores.shape
    b, k, t = torch.nonzero(scores > score_threshold, as_tuple=True)
    keep = batched_nms(boxes[b, t], scores[b, k, t], b * K + k, iou)  # best first
    group = (b * K + k)[keep]
    order = torch.sort(group, stable=True).indices  # group-major, best first within a group
    keep, group = keep[order], group[order]
    counts = torch.bincount(group, minlength=B * K)
    rank = torch.arange(group.numel(), device=group.device) - (torch.cumsum(counts, 0) - counts)[group]
    keep = keep[rank < max_per_class]
    return torch.stack([b[keep], k[keep], t[keep]], dim=1)


@nms_classwise.register_fake
def _(boxes, scores, max_per_class, iou, score_threshold):
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n, 3), dtype=torch.int64)


def _onnx_nms(boxes, scores, max_per_class: int, iou: float, score_threshold: float):
    """The ONNX translation of :func:`nms_classwise` (onnxscript, for the dynamo exporter)."""
    from onnxscript import opset18 as op

    return op.NonMaxSuppression(
        boxes, scores, op.Constant(value_ints=[max_per_class]), op.Constant(value_floats=[iou]),
        op.Constant(value_floats=[score_threshold]), center_point_box=0,
    )


TRANSLATIONS = {torch.ops.kdctl.nms_classwise.default: _onnx_nms}


# ============================================================================= the graph
class EndToEnd(nn.Module):
    """uint8 images ``[B, 3, H, W]`` -> (boxes, scores, labels, num_detections); see the module
    docstring. The detector and its priors of ``size`` (computed once, held as buffers) are in
    ``candidates``."""

    def __init__(self, model: MetaArchitecture, size: tuple[int, int], *, score_thr: float, nms_iou: float,
                 topk_pre_nms: int, max_det: int):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.nms_iou, self.max_det, self.num_classes = float(nms_iou), int(max_det), int(model.num_classes)
        m255, inv = normalization(model.mean, model.std)
        self.register_buffer("mean255", m255.view(1, -1, 1, 1))
        self.register_buffer("inv_std255", inv.view(1, -1, 1, 1))
        # the detector's own first postprocess stage on this canvas (models.postprocess.CanvasCandidates)
        self.candidates = model.eval().end_to_end_candidates(self.size, score_thr=score_thr, topk_pre_nms=topk_pre_nms)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = (images.float() - self.mean255) * self.inv_std255  # ToFloatNormalize: sub, then mul
        boxes, scores, labels, keep = self.candidates(x)
        B, T = scores.shape
        K = self.num_classes
        if T < self.max_det:  # fewer candidates than output rows: pad with never-kept ones
            pad = self.max_det - T
            boxes = torch.cat([boxes, boxes.new_zeros(B, pad, 4)], 1)
            scores = torch.cat([scores, scores.new_zeros(B, pad)], 1)
            labels = torch.cat([labels, labels.new_zeros(B, pad)], 1)
            keep = torch.cat([keep, keep.new_zeros(B, pad)], 1)
            T = self.max_det
        masked = torch.where(keep, scores, torch.full_like(scores, -1.0))
        classes = torch.arange(K, device=labels.device).view(1, K, 1)
        per_class = torch.where(labels[:, None, :] == classes, masked[:, None, :], torch.full_like(masked[:, None, :], -1.0))
        sel = torch.ops.kdctl.nms_classwise(boxes, per_class, self.max_det, self.nms_iou, -0.5)  # [S, 3]
        b, t = sel[:, 0], sel[:, 2]
        survivors = torch.full_like(scores, -1.0).index_put((b, t), scores[b, t])  # [B, T]
        top, idx = survivors.topk(self.max_det, dim=1)  # best first
        found = top >= 0
        out_boxes = torch.where(found[..., None], torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4)), 0.0)
        out_scores = torch.where(found, top, 0.0)
        out_labels = torch.where(found, torch.gather(labels, 1, idx), torch.full_like(idx, -1))
        return out_boxes, out_scores, out_labels, found.sum(1)
