"""Detection losses as plain functions on tensors.

Every loss returns an **unreduced** tensor (per element or per prior); the head sums/averages
it with :func:`weighted_mean` and multiplies by its weight (``Family.loss_weights``) in one
place (``DetectionLoss.weighted``). Leading dimensions are free: ``[N, K]`` below also means
``[B, A, K]``. The focal losses of every reference config use gamma 2, alpha 0.25.

Papers:
  * focal loss — Lin et al., "Focal Loss for Dense Object Detection" (RetinaNet), ICCV 2017.
  * quality focal loss (QFL), distribution focal loss (DFL) — Li et al., "Generalized Focal
    Loss", NeurIPS 2020.
  * GIoU loss — Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019.
  * IoU loss — Yu et al., "UnitBox", ACM MM 2016 (−log IoU), as used by FCOS (Tian et al.,
    ICCV 2019) together with the centerness target.

Label convention (as the assigners): ``labels`` in ``[0, K)`` is a foreground class, ``K`` is
background, ``-1`` is ignore (the row's loss is zero).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss


def _one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """labels ``[N]`` (K = background, -1 = ignore) -> (one-hot ``[N, K]``, valid ``[N]`` bool)."""
    valid = labels >= 0
    # a comparison against arange(K) gives the bool one-hot directly (background K and ignore -1
    # match no column); F.one_hot would build an int64 [N, K+1] tensor first
    classes = torch.arange(num_classes, device=labels.device)
    return (labels.unsqueeze(-1) == classes).to(dtype), valid


def focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss against one-hot targets.

    ``FL = -α_t (1 - p_t)^γ log p_t`` per class, with ``p = σ(logits)``, ``p_t = p`` for the
    target class and ``1 - p`` otherwise (``alpha < 0`` disables α-balancing).

    Args:
        logits: ``[N, K]`` class logits.
        labels: ``[N]`` int64, class index, ``K`` = background, ``-1`` = ignore.
    Returns:
        ``[N, K]`` loss; ignored rows are zero.
    """
    target, valid = _one_hot(labels, logits.shape[-1], logits.dtype)
    loss = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none")
    return torch.where(valid.unsqueeze(-1), loss, torch.zeros_like(loss))


def quality_focal_loss_soft(logits: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """Quality focal loss against soft targets (used by distillation).

    ``QFL(σ, y) = BCE(σ, y) · |y − σ|^β`` per class, computed with BCE-with-logits.

    Args:
        logits: ``[N, K]`` class logits.
        target: ``[N, K]`` soft targets in ``[0, 1]``.
    Returns:
        ``[N, K]`` loss.
    """
    scale = (target - logits.sigmoid()).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * scale


def quality_focal_loss(logits: Tensor, labels: Tensor, scores: Tensor, beta: float = 2.0) -> Tensor:
    """Quality focal loss of GFL with hard labels and an IoU-quality target.

    Negatives (every class of a background prior, and the non-target classes of a positive)
    get ``BCE(σ, 0) · σ^β``; the positive class gets ``BCE(σ, s) · |s − σ|^β`` where ``s`` is
    the IoU of the prior's decoded box with its ground truth. This is
    :func:`quality_focal_loss_soft` with target ``one_hot(labels) · scores``. MMDetection's
    ``QualityFocalLoss`` then sums over K; we return it unreduced.

    Args:
        logits: ``[N, K]`` joint class–quality logits.
        labels: ``[N]`` int64, class index, ``K`` = background, ``-1`` = ignore.
        scores: ``[N]`` quality target in ``[0, 1]`` (read for positives only).
    Returns:
        ``[N, K]`` loss; ignored rows are zero.
    """
    onehot, valid = _one_hot(labels, logits.shape[-1], logits.dtype)
    loss = quality_focal_loss_soft(logits, onehot * scores.to(logits.dtype).unsqueeze(-1), beta)
    return torch.where(valid.unsqueeze(-1), loss, torch.zeros_like(loss))


def distribution_focal_loss(dist_logits: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss of GFL for one box side.

    ``DFL(S, y) = −((y_r − y) log S_l + (y − y_l) log S_r)`` with ``S = softmax(dist_logits)``,
    ``y_l = floor(y)``, ``y_r = y_l + 1``: a two-bin cross-entropy that drives the discrete
    distribution's mass onto the two bins around ``y``. Its minimum over ``S`` is the binary
    entropy of ``(y_r − y, y − y_l)`` (zero when ``y`` is an integer).

    Args:
        dist_logits: ``[N, n+1]`` logits over bins ``0..n`` (``n = reg_max``).
        target: ``[N]`` float distance in bin units, in ``[0, n)``; the caller clamps it
            (mmdet's GFLHead clamps to ``n − 0.1``), an out-of-range target is an index error.
    Returns:
        ``[N]`` loss.
    """
    lead = target.shape
    logits = dist_logits.reshape(-1, dist_logits.shape[-1])
    y = target.reshape(-1).to(logits.dtype)
    left = y.floor().long()
    right = left + 1
    w_left, w_right = right.to(y.dtype) - y, y - left.to(y.dtype)
    loss = F.cross_entropy(logits, left, reduction="none") * w_left
    loss = loss + F.cross_entropy(logits, right, reduction="none") * w_right
    return loss.reshape(lead)


def aligned_iou(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of matching pairs of xyxy boxes (pixels): ``[N, 4], [N, 4] -> [N]``."""
    lt = torch.maximum(pred[..., :2], target[..., :2])
    rb = torch.minimum(pred[..., 2:], target[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_p = (pred[..., 2] - pred[..., 0]) * (pred[..., 3] - pred[..., 1])
    area_t = (target[..., 2] - target[..., 0]) * (target[..., 3] - target[..., 1])
    return inter / (area_p + area_t - inter).clamp(min=eps)


def iou_loss(pred: Tensor, target: Tensor, mode: str = "log", eps: float = 1e-6) -> Tensor:
    """IoU loss of matching xyxy boxes.

    ``mode="log"``: ``−log(max(IoU, eps))`` (UnitBox, the FCOS paper, and MMDetection's
    ``IoULoss`` default ``mode='log'`` used by its FCOS configs); ``mode="linear"``: ``1 − IoU``.

    Args:
        pred, target: ``[N, 4]`` xyxy boxes in pixels.
    Returns:
        ``[N]`` loss.
    """
    iou = aligned_iou(pred, target, eps)
    if mode == "log":
        return -iou.clamp(min=eps).log()
    if mode == "linear":
        return 1.0 - iou
    raise ValueError(f"iou_loss mode must be 'log' or 'linear', got {mode!r}")


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU loss ``1 − GIoU`` of matching xyxy boxes, via ``torchvision.ops``.

    ``GIoU = IoU − |C \\ (A ∪ B)| / |C|`` with ``C`` the smallest enclosing box; the loss lies
    in ``[0, 2]``.

    Args:
        pred, target: ``[N, 4]`` xyxy boxes in pixels, ``x1 <= x2``, ``y1 <= y2``.
    Returns:
        ``[N]`` loss.
    """
    return generalized_box_iou_loss(pred, target, reduction="none", eps=eps)


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``|pred − target|``: ``[N, 4], [N, 4] -> [N, 4]`` (RetinaNet, on encoded deltas)."""
    return (pred - target).abs()


def centerness_target(ltrb: Tensor, eps: float = 1e-12) -> Tensor:
    """FCOS centerness of a point inside its box.

    ``sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b))``: 1 at the box centre, towards 0 at
    the border. Train the centerness branch with ``F.binary_cross_entropy_with_logits``.

    Args:
        ltrb: ``[N, 4]`` distances (pixels or stride units) from the point to the box's
            left, top, right, bottom sides; meant for positives (all > 0). Points outside the
            box get 0 rather than NaN.
    Returns:
        ``[N]`` target in ``[0, 1]``.
    """
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    ratio_x = lr.min(dim=-1).values / lr.max(dim=-1).values.clamp(min=eps)
    ratio_y = tb.min(dim=-1).values / tb.max(dim=-1).values.clamp(min=eps)
    return (ratio_x * ratio_y).clamp(min=0).sqrt()


def weighted_mean(
    loss: Tensor,
    weight: Tensor | None = None,
    avg_factor: Tensor | float | None = None,
    min_factor: float = 1.0,
) -> Tensor:
    """Reduce a loss the way MMDetection's ``weight_reduce_loss`` does with ``avg_factor``.

    ``sum(loss · weight) / max(avg_factor, min_factor)``, or ``mean(loss · weight)`` when
    ``avg_factor`` is None. ``avg_factor`` stays a tensor (no host sync). The default
    ``min_factor = 1`` is the usual ``num_pos`` clamp, so an image without objects does not
    blow up; pass e.g. ``1e-6`` when ``avg_factor`` is a sum of soft weights that may be < 1
    (FCOS's centerness-weighted box loss).

    Args:
        loss: any shape, e.g. ``[N, K]``.
        weight: broadcastable from the left, e.g. ``[N]`` for a ``[N, K]`` loss.
    Returns:
        scalar tensor.
    """
    if weight is not None:
        weight = weight.reshape(weight.shape + (1,) * (loss.dim() - weight.dim()))
        loss = loss * weight
    if avg_factor is None:
        return loss.sum() / max(loss.numel(), 1)  # an empty loss gives 0, not NaN
    factor = torch.as_tensor(avg_factor, dtype=loss.dtype, device=loss.device)
    return loss.sum() / factor.clamp(min=min_factor)
