"""CrossKD: cross-head knowledge distillation (Wang et al., "CrossKD: Cross-Head Knowledge
Distillation for Object Detection", CVPR 2024; official code github.com/jbwang1997/CrossKD).

For each FPN level and each head branch (cls, reg):

1. take the student's tower output after block ``reuse_idx - 1`` **before** its activation
   (``reuse_idx = 0``: the FPN feature itself) — ``DenseHead.forward_tower`` (the level's own
   tower for heads with per-level towers, the yolo family's);
2. map it to the teacher's width with a learnable 1x1 conv when the widths differ (kdctl's
   addition for heterogeneous pairs; the official code only pairs equal widths);
3. align it to the teacher's statistics at the same point (:func:`align_scale`);
4. run the teacher's remaining blocks and predictors on it, with the teacher's per-level
   ``Scale`` — ``DenseHead.forward_from`` (ReLU first when ``reuse_idx > 0``). The teacher's
   layers are frozen but the path keeps its graph, so the gradient reaches the student's
   features, tower blocks ``< reuse_idx``, FPN and backbone — never the student's later blocks
   or predictors, which learn from the detection losses only;
5. the resulting cross-head predictions mimic the teacher's own predictions with the losses of
   :mod:`kdctl.distill.prediction`.

Between two families (kdctl's extension, opt-in by ``reuse_idx: 0``; the pairs
:func:`kdctl.recipe.pairs.crosses_families` accepts, e.g. a GFL teacher of a yolo student): the
student's neck features run through the teacher's whole head on the student's levels (the first
ones of the teacher's neck), and the losses are the teacher family's, against the teacher's own
predictions on those levels; the student's priors and box coder take no part.

Defaults (``configs/crosskd/``, ``Family.reuse_idx``): 3 for GFL, RetinaNet and ATSS, 2 for FCOS;
2 for yolo (kdctl's, chosen by measurement; see ``kdctl/models/families/yolo.py``).
"""
from __future__ import annotations

from torch import Tensor, nn

from kdctl.distill.kd import KDInputs, KDMethod
from kdctl.distill.prediction import prediction_kd
from kdctl.models.contract import DENSE_OUTPUTS, DENSE_TOWER
from kdctl.models.decoders import BoxDecoder
from kdctl.models.families.family import PredictionKD
from kdctl.models.head import BRANCHES, DenseHead
from kdctl.models.necks import level_widths


def align_scale(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise each channel of ``student`` over (N, H, W) and give it the teacher's
    per-channel mean and std at the same point (``align_scale`` of the official code: unbiased
    std, ``eps`` added to the student's std only). Both ``[B, C, H, W]``."""
    s = student.transpose(0, 1).flatten(1)  # [C, B*H*W]
    t = teacher.detach().transpose(0, 1).flatten(1)
    s_mean, s_std = s.mean(dim=1, keepdim=True), s.std(dim=1, keepdim=True)
    t_mean, t_std = t.mean(dim=1, keepdim=True), t.std(dim=1, keepdim=True)
    out = (s - s_mean) / (s_std + eps) * t_std + t_mean
    return out.view(student.shape[1], student.shape[0], *student.shape[2:]).transpose(0, 1)


def width_at(head: DenseHead, idx: int) -> int | list[int]:
    """Channels of ``forward_tower(x, b, idx)``: the neck's width at 0 (a list of one per level
    for a neck whose widths differ), the tower width after."""
    return head.in_channels if idx == 0 else head.feat_channels


class CrossKD(KDMethod):
    """The ``crosskd`` method: cross-head predictions of one batch (the student's tower features
    at ``reuse_idx`` through the teacher's head) mimic the teacher's predictions. Holds only the
    optional adapters (one 1x1 conv per branch, shared across levels). Losses
    ``loss_crosskd_cls`` / ``_reg`` (/ ``_ctr``).

    Args:
        student_head, teacher_head: the two heads (same family).
        spec: the family's prediction-KD losses (``Family.kd``); ``decoder``: the student's
            (with ``across``: the teacher family's and the teacher's).
        reuse_idx: the tower block the student's features are taken after.
        adapter: True / False / "auto" (only when the widths at ``reuse_idx`` differ).
        weight, cls_weight, reg_weight, temperature, beta: see :func:`prediction_kd`.
        across: the two heads are of different families (see the module docstring).
    """

    name = "crosskd"
    reads = frozenset({"tower", "head"})
    needs = frozenset({DENSE_TOWER, DENSE_OUTPUTS})

    def __init__(self, student_head: DenseHead, teacher_head: DenseHead, spec: PredictionKD, decoder: BoxDecoder,
                 reuse_idx: int, adapter: bool | str = "auto", *, weight: float = 1.0, cls_weight: float | None = None,
                 reg_weight: float | None = None, temperature: float = 1.0, beta: float = 1.0, across: bool = False):
        super().__init__()
        self.across = across
        self.reuse_idx = self.tower_idx = reuse_idx
        s_w, t_w = width_at(student_head, self.reuse_idx), width_at(teacher_head, self.reuse_idx)
        # necks with one width per level (the yolo family's pyramid PAN) get one adapter per branch
        # and level at reuse_idx 0 (keys "cls_0", ...); otherwise one per branch, shared by the levels
        self.per_level = not (isinstance(s_w, int) and isinstance(t_w, int))
        if self.per_level:
            levels = min(student_head.num_levels, teacher_head.num_levels)
            s_l, t_l = level_widths(s_w, levels), level_widths(t_w, levels)
            use = any(a != b for a, b in zip(s_l, t_l)) if adapter == "auto" else bool(adapter)
            convs = {f"{b}_{i}": nn.Conv2d(s_l[i], t_l[i], 1) for b in BRANCHES for i in range(levels)}
        else:
            use = s_w != t_w if adapter == "auto" else bool(adapter)
            convs = {b: nn.Conv2d(s_w, t_w, 1) for b in BRANCHES}
        self.adapters = nn.ModuleDict(convs) if use else None
        self.spec, self.decoder = spec, decoder
        self.options = {"weight": weight, "cls_weight": cls_weight, "reg_weight": reg_weight,
                        "temperature": temperature, "beta": beta}

    def cross_predictions(self, student_mid: dict[str, list[Tensor]], teacher_mid: dict[str, list[Tensor]],
                          teacher_head: DenseHead) -> dict[str, list[Tensor]]:
        """Per-level raw outputs of the teacher's head continued from the aligned student features."""
        out: dict[str, list[Tensor]] = {name: [] for name in teacher_head.output_names}
        for branch in BRANCHES:
            for level, (s, t) in enumerate(zip(student_mid[branch], teacher_mid[branch])):
                if self.adapters is not None:
                    s = self.adapters[f"{branch}_{level}" if self.per_level else branch](s)
                aligned = align_scale(s, t)
                for name, value in teacher_head.forward_from(aligned, branch, self.reuse_idx, level).items():
                    out[name].append(value)
        return out

    def forward(self, inputs: KDInputs) -> dict[str, Tensor]:
        t = inputs.teacher
        cross = t.flat_outputs(self.cross_predictions(inputs.s_mid, inputs.t_mid, t.head))
        t_flat = inputs.t_flat
        if self.across:  # the teacher's rows of the student's levels: the first ones (level-major, as zip above stops)
            t_flat = {name: rows[:, :cross[name].shape[1]] for name, rows in t_flat.items()}
        return prediction_kd(self.spec, self.decoder, cross, t_flat, inputs.priors, inputs.assignment,
                             prefix="loss_crosskd", reduce=inputs.reduce, **self.options)
