"""The one dense postprocess: raw flattened head outputs -> :class:`Detections` in original-image
pixels. Its stages are composed by every caller: evaluation and ``kdctl.load_detector``
(:func:`postprocess`), the end-to-end export graph (:func:`candidates`, then its NMS op) and the
model-file runner (:func:`to_original`). It depends on the family's box decoder only
(:mod:`kdctl.models.decoders`), never on losses or assigners.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from kdctl.models.decoders import BoxDecoder
from kdctl.models.priors import Priors

__all__ = ["Detections", "candidates", "postprocess", "to_original"]


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



def candidates(decoder: BoxDecoder, flat: dict[str, Tensor], priors: Priors, limit: Tensor, *, score_thr: float,
               topk_pre_nms: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-3 of :func:`postprocess`: the candidates before NMS.

    ``limit``: the clip extent ``(W, H, W, H)``, ``[B, 1, 4]`` (each image's valid size) or ``[4]``
    (one canvas: the end-to-end graph). Returns ``boxes [B, T, 4]`` (xyxy pixels of the resized
    image, clipped to ``[0, limit]``), ``scores [B, T]``, ``labels [B, T]`` int64 and ``keep
    [B, T]`` bool (score above ``score_thr`` and, with ``decoder.drop_empty``, a box of positive
    width and height), ``T = sum_l min(topk_pre_nms, N_l * K)``."""
    K = flat["cls"].shape[-1]
    B = flat["cls"].shape[0]
    boxes, scores, labels, kept = [], [], [], []
    start = 0
    fused = decoder.score == "sqrt-centerness"
    for n in priors.num_level_priors:
        cls = flat["cls"][:, start:start + n].float().sigmoid()
        if fused:
            cls = torch.sqrt(cls * flat["centerness"][:, start:start + n].float().sigmoid())
        cls = cls.reshape(B, n * K)
        top, idx = cls.topk(min(topk_pre_nms, n * K), dim=1)  # [B, k]
        prior = idx.div(K, rounding_mode="floor") + start
        reg = torch.gather(flat["reg"], 1, prior[..., None].expand(-1, -1, flat["reg"].shape[-1])).float()
        score = top
        if decoder.score == "centerness":
            ctr = torch.gather(flat["centerness"], 1, prior[..., None]).squeeze(-1).float().sigmoid()
            score = torch.where(top > score_thr, top * ctr, top)  # threshold on cls score first, as mmdet
        boxes.append(decoder.decode(reg, priors, prior))
        scores.append(score)
        labels.append(idx.remainder(K))
        kept.append(top > score_thr)
        start += n
    box = torch.minimum(torch.cat(boxes, 1).clamp(min=0), limit)
    keep = torch.cat(kept, 1)
    if decoder.drop_empty:
        keep = keep & (box[..., 2] > box[..., 0]) & (box[..., 3] > box[..., 1])
    return box, torch.cat(scores, 1), torch.cat(labels, 1), keep


def to_original(boxes: Tensor, scales: Tensor) -> Tensor:
    """xyxy ``[D, 4]`` boxes of the resized image -> original-image pixels; ``scales`` ``[D, 2]``
    (y, x) is each row's resized / original factor (step 5 of :func:`postprocess`)."""
    return boxes / torch.stack([scales[:, 1], scales[:, 0], scales[:, 1], scales[:, 0]], dim=-1)


def postprocess(
    decoder: BoxDecoder,
    flat: dict[str, Tensor],
    priors: Priors,
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
    2. decode only those boxes; clip to the image's valid (resized, unpadded) size; with
       ``decoder.drop_empty`` (every family but torchvision's converted models) drop the boxes
       whose width or height is 0 after clipping (mmdet ``min_bbox_size=0``), before NMS;
    3. decoder score rule ``"centerness"`` (FCOS/ATSS): score *= sigmoid(centerness)
       (``with_score_factor``); with ``"sqrt-centerness"`` (torchvision's FCOS) the score is
       instead ``sqrt(sigmoid(cls) * sigmoid(centerness))`` from the start, and steps 1-2 rank
       and threshold that score (torchvision ``FCOS.postprocess_detections``);
    4. class-wise NMS at ``nms_iou`` for all images at once (``batched_nms`` with one group per
       (image, class)); keep the best ``max_per_image`` per image;
    5. boxes back to original-image pixels by the batch's ``scales`` (resized / original).

    Steps 1-3 are :func:`candidates`, which the end-to-end export graph runs too (on its whole
    canvas, before its NMS op).

    Args:
        decoder: the family's :class:`~kdctl.models.decoders.BoxDecoder` (boxes, score rule).
        flat: flattened outputs ``{"cls": [B, N, K], "reg": [B, N, R], "centerness": [B, N, 1]}``.
        priors: the :class:`~kdctl.models.priors.Priors` of those N rows.
        valid_sizes: int64 ``[B, 2]`` (h, w) after resize, before padding.
        scales: float ``[B, 2]`` (y, x) scale factors resized / original.
    """
    K = flat["cls"].shape[-1]
    B = flat["cls"].shape[0]
    device = flat["cls"].device
    hw = valid_sizes.to(device=device, dtype=torch.float32)
    limit = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)[:, None, :]
    boxes_t, scores_t, labels_t, valid = candidates(decoder, flat, priors, limit, score_thr=score_thr,
                                                    topk_pre_nms=topk_pre_nms)
    bidx_t = torch.arange(B, device=device)[:, None].expand_as(labels_t)
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
    bx = to_original(bx, scales.to(device=device, dtype=bx.dtype)[b])
    return Detections(batch_index=b, boxes=bx, scores=sc, labels=lb)


class CanvasCandidates(nn.Module):
    """A dense detector's first postprocess stage on one fixed ``H x W`` canvas, as a module the
    end-to-end export graph traces: normalised images ``[B, 3, H, W]`` -> :func:`candidates`
    (boxes, scores, labels, keep). The priors of ``size`` are computed once here and held as
    buffers (constants of the graph)."""

    def __init__(self, detector: nn.Module, size: tuple[int, int], *, score_thr: float, topk_pre_nms: int):
        super().__init__()
        self.detector = detector.eval()
        self.size = (int(size[0]), int(size[1]))
        self.score_thr, self.topk_pre_nms = float(score_thr), int(topk_pre_nms)
        with torch.no_grad():
            out = detector(torch.zeros(1, 3, *self.size))
        pri = detector.priors(out)
        self.num_level_priors = list(pri.num_level_priors)
        self.register_buffer("points", pri.points.clone())
        self.register_buffer("stride", pri.stride.clone())
        self.register_buffer("level", pri.level.clone())
        self.has_anchors = pri.anchors is not None
        self.register_buffer("anchors", pri.anchors.clone() if self.has_anchors else torch.zeros(0, 4))

    def priors(self) -> Priors:
        return Priors(self.points, self.stride, self.level, self.anchors if self.has_anchors else None, self.num_level_priors)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.detector
        flat = m.flat_outputs(m(images))
        H, W = self.size
        limit = flat["cls"].new_tensor([W, H, W, H], dtype=torch.float32)
        return candidates(m.decoder, flat, self.priors(), limit, score_thr=self.score_thr, topk_pre_nms=self.topk_pre_nms)
