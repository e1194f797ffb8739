"""The one postprocess that evaluation, export checks and ``kdctl.load_detector`` share: raw
flattened head outputs -> :class:`Detections` in original-image pixels. It depends on the
family's box decoder only (:mod:`kdctl.models.decoders`), never on losses or assigners.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from kdctl.models.decoders import BoxDecoder
from kdctl.models.priors import Priors

__all__ = ["Detections", "postprocess"]


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

    Args:
        decoder: the family's :class:`~kdctl.models.decoders.BoxDecoder` (boxes, score rule).
        flat: flattened outputs ``{"cls": [B, N, K], "reg": [B, N, R], "centerness": [B, N, 1]}``.
        priors: the :class:`~kdctl.models.priors.Priors` of those N rows.
        valid_sizes: int64 ``[B, 2]`` (h, w) after resize, before padding.
        scales: float ``[B, 2]`` (y, x) scale factors resized / original.
    """
    K = flat["cls"].shape[-1]
    pri = priors
    B = flat["cls"].shape[0]
    device = flat["cls"].device
    boxes, scores, labels, kept = [], [], [], []
    start = 0
    fused = decoder.score == "sqrt-centerness"
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
        box = decoder.decode(reg, pri, prior)
        score = top
        if decoder.score == "centerness":
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
    if decoder.drop_empty:
        valid = valid & (boxes_t[..., 2] > boxes_t[..., 0]) & (boxes_t[..., 3] > boxes_t[..., 1])
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
