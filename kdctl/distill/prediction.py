"""Prediction distillation losses: what CrossKD's cross-head predictions (and, in the direct
prediction-mimicking baseline, the student's own predictions) are trained with.

Everything follows the official CrossKD implementation (github.com/jbwang1997/CrossKD,
``mmdet/models/detectors/crosskd_{gfl,retinanet,atss,fcos}.py``, ``mmdet/models/losses/kd_loss.py``
and ``configs/crosskd/``), on the flattened batch ``[B, N, C]`` with masks instead of per-image
lists. ``w`` below is the teacher's confidence ``sigmoid(max_k teacher_logit)`` of each prior.

=========  =====================================  ====================================================
head       classification (weight, normaliser)    regression (weight, normaliser)
=========  =====================================  ====================================================
GFL        KD-QFL β=1 on valid priors; 1.0; #pos  KL(softmax(t/T) || softmax(p/T)) summed over the
                                                  reg_max+1 bins, ×T², per side, weighted by w on
                                                  valid priors; 4.0; ÷ 4 ÷ Σw
RetinaNet  KD-QFL on valid priors; 1.0; #pos      GIoU of the boxes both decode from the anchors,
                                                  weighted by w on valid priors; 1.0; #pos
ATSS       as RetinaNet                           as RetinaNet; + centerness BCE(p, σ(t)) on
                                                  positives; 1.0; #pos
FCOS       KD-QFL on every point; 0.4; Σctr       IoU (−log) of decoded boxes weighted by w on every
                                                  point; 0.75; Σctr (the centerness-target sum of
                                                  the positives, as FCOS's own box loss)
=========  =====================================  ====================================================

KD-QFL (Li et al. GFL's QFL with the teacher's score as the soft target):
``BCE(p, σ(t)) · |σ(p) − σ(t)|^β``, summed over classes. The teacher's side is always detached.
``#pos`` and ``Σctr`` go through ``reduce`` (mean over processes); GFL's ``Σw`` stays local, as
in the official code.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdctl.distill.kd import KDInputs, KDMethod
from kdctl.models.assigners import Assignment
from kdctl.models.contract import DENSE_OUTPUTS
from kdctl.models.decoders import BoxDecoder
from kdctl.models.families.family import PredictionKD, centerness_targets
from kdctl.models.losses import giou_loss, iou_loss, weighted_mean
from kdctl.models.priors import Priors

Reduce = Callable[[Tensor], Tensor]


def kd_quality_focal_loss(logits: Tensor, teacher_logits: Tensor, beta: float = 1.0) -> Tensor:
    """``BCE(logits, σ(t)) · |σ(logits) − σ(t)|^β`` per element (``[..., K]``); t detached."""
    target = teacher_logits.detach().sigmoid()
    scale = (logits.sigmoid() - target).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * scale


def distribution_kl(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t/T) ‖ softmax(p/T)) · T² over the last dim (bins), summed: ``[..., bins]`` ->
    ``[...]`` (``class_reduction='sum'`` of CrossKD's ``KnowledgeDistillationKLDivLoss``)."""
    target = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    log_p = F.log_softmax(logits / temperature, dim=-1)
    kl = F.kl_div(log_p, target, reduction="none").sum(dim=-1)
    return kl * (temperature * temperature)


def prediction_kd(
    spec: PredictionKD,
    decoder: BoxDecoder,
    pred: dict[str, Tensor],
    teacher: dict[str, Tensor],
    priors: Priors,
    assignment: Assignment,
    *,
    prefix: str,
    weight: float = 1.0,
    cls_weight: float | None = None,
    reg_weight: float | None = None,
    temperature: float = 1.0,
    beta: float = 1.0,
    reduce: Reduce = lambda t: t,
) -> dict[str, Tensor]:
    """Named weighted KD losses of flattened predictions ``pred`` against the teacher's.

    Args:
        spec: the family's prediction-KD losses and weights (``Family.kd``; both sides share the family).
        decoder: the student's box decoder (decodes both sides' boxes from ``priors``).
        pred, teacher: ``{"cls": [B, N, K], "reg": [B, N, R], "centerness": [B, N, 1]}``.
        assignment: the student's assignment of this batch (valid priors, positives).
        prefix: loss-name prefix, e.g. ``"loss_crosskd"`` -> ``loss_crosskd_cls`` / ``_reg`` / ``_ctr``.
        weight: multiplies every term; ``cls_weight`` / ``reg_weight`` None: ``spec``'s.
    """
    cls_w = weight * (spec.cls_weight if cls_weight is None else cls_weight)
    reg_w = weight * (spec.reg_weight if reg_weight is None else reg_weight)
    a = assignment
    p_cls, t_cls = pred["cls"].float(), teacher["cls"].detach().float()
    p_reg, t_reg = pred["reg"].float(), teacher["reg"].detach().float()
    valid = a.labels >= 0  # [B, N]
    w = t_cls.amax(dim=-1).sigmoid()  # teacher confidence [B, N]
    if spec.mask_invalid:
        w = torch.where(valid, w, 0.0)

    if spec.norm == "centerness":
        # FCOS: the sum of the positives' centerness targets (FCOS's own box-loss denominator)
        norm = reduce(centerness_targets(a, priors).sum())
        min_factor = 1e-6
    else:
        norm = reduce(a.num_pos.float())
        min_factor = 1.0

    qfl = kd_quality_focal_loss(p_cls, t_cls, beta)
    if spec.mask_invalid:
        qfl = torch.where(valid[..., None], qfl, 0.0)
    losses = {f"{prefix}_cls": cls_w * weighted_mean(qfl, avg_factor=norm, min_factor=min_factor)}

    if spec.reg_loss == "kl":
        reg_max = decoder.reg_max
        kl = distribution_kl(p_reg.unflatten(-1, (4, reg_max + 1)), t_reg.unflatten(-1, (4, reg_max + 1)), temperature)
        # sum(w * KL) / 4.0 (avg_factor), then divided by the sum of w over all levels
        losses[f"{prefix}_reg"] = reg_w * weighted_mean(kl, w, avg_factor=4.0 * w.sum(), min_factor=1e-6)
    else:
        p_box = decoder.decode(p_reg, priors)
        t_box = decoder.decode(t_reg, priors)
        box = giou_loss(p_box, t_box) if spec.reg_loss == "giou" else iou_loss(p_box, t_box)
        losses[f"{prefix}_reg"] = reg_w * weighted_mean(box, w, avg_factor=norm, min_factor=min_factor)

    if spec.ctr_weight and "centerness" in pred:
        ctr = F.binary_cross_entropy_with_logits(pred["centerness"].float(), teacher["centerness"].detach().float().sigmoid(),
                                                 reduction="none").squeeze(-1)
        ctr = torch.where(a.pos_mask, ctr, 0.0)
        losses[f"{prefix}_ctr"] = weight * spec.ctr_weight * weighted_mean(ctr, avg_factor=norm)
    return losses


class PredictionMimic(KDMethod):
    """``pred_mimic``: the student's own predictions mimic the teacher's, with the losses CrossKD
    applies to its cross-head predictions (the comparison of Wang et al.). Reads both heads'
    outputs; losses ``loss_mimic_cls`` / ``_reg`` (/ ``_ctr``)."""

    name = "pred_mimic"
    reads = frozenset({"head"})
    needs = frozenset({DENSE_OUTPUTS})

    def __init__(self, spec: PredictionKD, decoder: BoxDecoder, *, weight: float = 1.0, cls_weight: float | None = None,
                 reg_weight: float | None = None, temperature: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.spec, self.decoder = spec, decoder
        self.options = {"weight": weight, "cls_weight": cls_weight, "reg_weight": reg_weight,
                        "temperature": temperature, "beta": beta}

    def forward(self, inputs: KDInputs) -> dict[str, Tensor]:
        s_flat = inputs.student.flat_outputs(inputs.s_out)
        return prediction_kd(self.spec, self.decoder, s_flat, inputs.t_flat, inputs.priors, inputs.assignment, prefix="loss_mimic", reduce=inputs.reduce, **self.options)
