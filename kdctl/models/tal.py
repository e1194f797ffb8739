"""Task-aligned assignment (Feng et al., "TOOD: Task-aligned One-stage Object Detection", ICCV
2021, Sec. 3.2 "Task-aligned Sample Assignment"), batched over images.

For every image, point prior ``i`` and real GT ``g`` (class ``c_g``), from the predictions:

    s_ig = sigmoid(cls_logit_i)[c_g]                     the predicted score of g's class
    u_ig = IoU(decoded predicted box_i, gt_g)
    t_ig = s_ig ** alpha * u_ig ** beta                  the alignment metric (TOOD eq. 1)

1. candidates of ``g``: the points strictly inside its box (every side more than ``eps``);
2. for each ``g``, the ``topk`` candidates with the largest ``t_ig`` are its positives;
3. a point that is a positive of several GTs keeps the one with the highest IoU ``u_ig`` (the
   lowest GT index on ties); every other point is background (label K), and a non-positive
   point inside an ignore region is ignored (-1, the rule of :mod:`kdctl.models.assigners`);
4. the soft target of a positive ``i`` of ``g`` is TOOD's normalised metric
   ``t_ig / max_j t_jg * max_j u_jg`` over the positives ``j`` of ``g`` (Sec. 3.2.2: "the
   maximum of t-hat equals the largest IoU value within each instance").

alpha 0.5, beta 6.0 and topk 10 are the usual real-time defaults (TOOD's own are alpha 1,
beta 6, topk 13). TOOD assigns its first epochs with ATSS while the predictions are still
meaningless; here, instead, when no predictions are given (``preds=None``: the conflict
analysis without a student checkpoint, unit tests) the rule reads the predictions of an
untrained head: score 1 and the box that a uniform distance distribution decodes to
(``reg_max / 2`` strides on every side), which ranks each object's points by how well that
level's box size fits it.

Points in the padding of a smaller image of the batch stay background (as FCOS's; no
``exclude_padding``). Label convention and inputs as :mod:`kdctl.models.assigners`; the result is an
:class:`AlignedAssignment`, an :class:`~kdctl.models.assigners.Assignment` that also carries
the soft targets (``scores``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdctl.models.assigners import Assigner, Assignment, _assignment, _ignored, pairwise_iou
from kdctl.models.decoders import BoxDecoder
from kdctl.models.priors import Priors

__all__ = ["AlignedAssignment", "TaskAlignedAssigner"]


@dataclass
class AlignedAssignment(Assignment):
    """An :class:`Assignment` with TOOD's normalised alignment target per prior.

    scores  float [B, A]  the soft classification target of the assigned class at positives
                          (in ``[0, 1]``), 0 elsewhere
    """

    scores: Tensor


class TaskAlignedAssigner(Assigner):
    """TOOD's task-aligned assigner over point priors (see the module docstring).

    Args:
        decoder: the family's box decoder (decodes the predicted boxes; its ``reg_max`` gives
            the prediction-free fallback box).
        alpha, beta: exponents of the score and the IoU in the alignment metric.
        topk: positives per object, at most.
        ignore_iof_thr: the ignore rule's threshold (negative disables).
        eps: a point is inside a box when every side is more than ``eps`` px away; also the
            normaliser's guard.
    """

    uses_anchors = False

    def __init__(self, decoder: BoxDecoder, alpha: float = 0.5, beta: float = 6.0, topk: int = 10,
                 ignore_iof_thr: float = 0.5, eps: float = 1e-9):
        self.decoder = decoder
        self.alpha, self.beta, self.topk = alpha, beta, topk
        self.ignore_iof_thr = ignore_iof_thr
        self.eps = eps

    @torch.no_grad()
    def assign(self, priors: Priors, batch, num_classes: int,
               preds: dict[str, Tensor] | None = None) -> AlignedAssignment:
        """Assign ``priors`` against ``batch``'s GTs from the flattened predictions ``preds``
        (``{"cls": [B, N, K] logits, "reg": [B, N, R]}``), or None (see the module docstring)."""
        B = batch.labels.shape[0]
        if preds is None:
            reg_channels = 4 * (self.decoder.reg_max + 1)
            reg = torch.zeros(1, priors.points.shape[0], reg_channels, device=priors.points.device)
            boxes = self.decoder.decode(reg, priors).expand(B, -1, -1)
            scores = torch.ones(B, priors.points.shape[0], num_classes, device=priors.points.device)
        else:
            scores = preds["cls"].detach().float().sigmoid()
            boxes = self.decoder.decode(preds["reg"].detach().float(), priors)
        return self(priors.points, scores, boxes, batch.boxes, batch.labels, batch.gt_mask, num_classes=num_classes,
                     ignore=batch.ignore, ignore_mask=batch.ignore_mask)

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        pred_scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        *,
        num_classes: int,
        ignore: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> AlignedAssignment:
        """Assign ``points`` (float ``[A, 2]`` xy pixels) from ``pred_scores`` (probabilities
        ``[B, A, K]``) and ``pred_boxes`` (xyxy pixels ``[B, A, 4]``); GT inputs as in
        :mod:`kdctl.models.assigners`. Returns an :class:`AlignedAssignment` ``[B, A]``."""
        points = points.float()
        B, G = gt_labels.shape
        A = points.shape[0]
        ignored = _ignored(points, ignore, ignore_mask, self.ignore_iof_thr)
        matched = torch.full((B, A), -1, dtype=torch.int64, device=points.device)
        if G == 0:
            a = _assignment(matched, matched < 0, gt_boxes, gt_labels, num_classes, ignored)
            return AlignedAssignment(**vars(a), scores=torch.zeros(B, A, device=points.device))

        g = gt_boxes.float()[:, None, :, :]  # [B, 1, G, 4]
        x, y = points[None, :, None, 0], points[None, :, None, 1]  # [1, A, 1]
        side = torch.minimum(torch.minimum(x - g[..., 0], y - g[..., 1]), torch.minimum(g[..., 2] - x, g[..., 3] - y))
        inside = (side > self.eps) & gt_mask[:, None, :]  # [B, A, G]

        iou = pairwise_iou(pred_boxes.float(), gt_boxes.float()).clamp_(min=0)  # [B, A, G]
        cls = gt_labels.clamp(min=0)[:, None, :].expand(B, A, G)
        score = torch.gather(pred_scores.float(), 2, cls)  # [B, A, G]: s_ig
        metric = torch.where(inside, score.pow(self.alpha) * iou.pow(self.beta), 0.0)

        k = min(self.topk, A)
        # top-k among the candidates: a candidate with metric 0 still outranks every non-candidate
        top = torch.where(inside, metric, -1.0).topk(k, dim=1).indices  # [B, k, G]
        chosen = torch.zeros_like(inside).scatter_(1, top, True) & inside  # [B, A, G]

        # a point chosen by several GTs keeps the highest-IoU one (max returns the first index on ties)
        best_iou, best = torch.where(chosen, iou, -1.0).max(dim=-1)  # [B, A]
        matched = torch.where(chosen.any(dim=-1), best, matched)
        a = _assignment(matched, matched < 0, gt_boxes, gt_labels, num_classes, ignored)

        # TOOD's normalisation per object, over its final positives
        pair = matched[..., None] == torch.arange(G, device=points.device)  # [B, A, G]; none where -1
        t = torch.where(pair, metric, 0.0)
        u_max = torch.where(pair, iou, 0.0).amax(dim=1, keepdim=True)  # [B, 1, G]
        t_max = t.amax(dim=1, keepdim=True)
        target = (t * u_max / (t_max + self.eps)).amax(dim=-1)  # [B, A]: the one non-zero entry
        return AlignedAssignment(**vars(a), scores=torch.where(a.pos_mask, target, 0.0))
