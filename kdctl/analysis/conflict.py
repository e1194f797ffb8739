"""Teacher–student target conflict (CrossKD, Wang et al., CVPR 2024, §3.1 and Figs. 2–3), batched.

The unit of comparison is a **location** ``(level, y, x)`` of the student's FPN grid: row ``l``
of ``L = sum(H_l * W_l)``, level-major then y then x, the order of :mod:`kdctl.models.priors`.
A head with ``A`` priors per location (RetinaNet: 9) is reduced to its locations:

* scores (teacher, student, cross-head): per class, the **max over the location's A priors**;
* the teacher's box at a location: the box of the prior whose score for the student's assigned
  class is highest (at background locations: for class 0; the box is only read at positives);
* the student's target at a location: per class, the max over its priors' targets; the
  location's assigned GT is that of its first positive prior (anchor order).

Discrepancy of a location between a reference map ``t`` (e.g. the student's target) and a
teacher's sigmoid scores ``s``, both ``[K]``: ``d = max_k |t_k - s_k|``; in per-class mode every
(location, class) pair is a unit with ``d = |t_k - s_k|``. A unit is **non-trivial** when
``max(t) > floor`` or ``max(s) > floor`` (per class: ``t_k`` or ``s_k``), and a **conflict**
when ``d > threshold``. Units at ignored locations (every prior ignored by the assigner) and at
cells whose origin lies in the batch's padding are not counted, so the numbers do not depend
on how images are batched.

Statistics accumulate on the device as integer counts (``torch.bincount``) indexed by
(non-trivial, level, size, bin, above threshold) plus float64 sums; no host sync per batch.
Size: the COCO size of the location's assigned GT on the **original** image (small < 32²,
medium < 96², large, in px²); non-positive locations are ``background``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdctl.models.assigners import Assignment
from kdctl.models.families.family import DetectionLoss
from kdctl.models.priors import Priors
from kdctl.models.losses import aligned_iou

__all__ = [
    "BINS", "SIZES", "Locations", "locate", "per_location", "teacher_at_locations", "student_targets",
    "discrepancy", "ConflictStats", "RegressionStats", "level_names",
]

BINS = 10  # equal bins of [0, 1]: [0, .1), ..., [.9, 1.0]
SIZES = ("background", "small", "medium", "large")
COCO_SMALL, COCO_MEDIUM = 32.0**2, 96.0**2


@dataclass
class Locations:
    """The student's assignment of one batch reduced to its L locations.

    labels  int64 [B, L]     class in ``[0, K)`` at positives, ``K`` background, -1 ignored
    boxes   float [B, L, 4]  assigned GT, xyxy pixels of the resized image; zeros elsewhere
    pos     bool  [B, L]
    valid   bool  [B, L]     counted: some prior not ignored and the cell inside the image
    size    int64 [B, L]     index into :data:`SIZES`
    level   int64 [L]        FPN level index (0 = P3)
    anchors int              student priors per location
    """

    labels: Tensor
    boxes: Tensor
    pos: Tensor
    valid: Tensor
    size: Tensor
    level: Tensor
    anchors: int


def level_names(num_levels: int) -> list[str]:
    """``["P3", ..., "P7"]`` for kdctl's FPN (first level stride 8)."""
    return [f"P{3 + i}" for i in range(num_levels)]


def per_location(x: Tensor, anchors: int) -> Tensor:
    """``[B, N, C]`` prior rows -> ``[B, L, A, C]`` with ``N = L * A`` (the A priors of a
    location are consecutive rows, :mod:`kdctl.models.priors`)."""
    B, N, C = x.shape
    return x.view(B, N // anchors, anchors, C)


def locate(assignment: Assignment, priors: Priors, anchors: int, valid_sizes: Tensor, scales: Tensor,
           point_offset: float = 0.0) -> Locations:
    """Reduce a student :class:`Assignment` ``[B, N]`` to locations (module docstring).

    Args:
        priors: the student's priors (``N`` rows).
        anchors: priors per location (``N = L * anchors``).
        valid_sizes: int64 ``[B, 2]`` (h, w) of each image before padding.
        scales: float ``[B, 2]`` (y, x) resized / original, to give GT areas in original pixels.
        point_offset: the prior generator's offset in strides (0 anchors, 0.5 FCOS points).
    """
    a = assignment
    B, N = a.labels.shape
    labels = a.labels.view(B, N // anchors, anchors)
    pos_a = a.pos_mask.view(B, N // anchors, anchors)
    # first positive prior of the location, else the first not ignored, else the first
    rank = torch.where(pos_a, 2, torch.where(labels >= 0, 1, 0)).to(torch.uint8)
    rep = rank.argmax(dim=-1, keepdim=True)  # [B, L, 1]
    lab = torch.gather(labels, 2, rep).squeeze(-1)
    boxes = torch.gather(a.boxes.view(B, N // anchors, anchors, 4), 2, rep[..., None].expand(-1, -1, 1, 4)).squeeze(2)
    pos = pos_a.any(dim=-1)
    stride = priors.stride[::anchors]
    origin = priors.points[::anchors] - point_offset * stride[:, None]  # [L, 2] cell origin, pixels
    hw = valid_sizes.to(origin.device, origin.dtype)
    inside = (origin[None, :, 0] < hw[:, None, 1]) & (origin[None, :, 1] < hw[:, None, 0])
    valid = (lab >= 0) & inside
    s = scales.to(boxes.device, torch.float32)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / (s[:, 0] * s[:, 1])[:, None]
    size = torch.where(area < COCO_SMALL, 1, torch.where(area < COCO_MEDIUM, 2, 3))
    size = torch.where(pos, size, 0)
    return Locations(labels=lab, boxes=boxes, pos=pos, valid=valid, size=size, level=priors.level[::anchors],
                     anchors=anchors)


def teacher_at_locations(scores: Tensor, boxes: Tensor, anchors: int, labels: Tensor) -> tuple[Tensor, Tensor]:
    """A teacher's sigmoid ``scores`` ``[B, N_t, K]`` and decoded ``boxes`` ``[B, N_t, 4]`` (xyxy
    pixels) at the L locations: scores max over the location's ``anchors`` priors ``[B, L, K]``;
    the box of the prior scoring highest on ``labels`` (``[B, L]``, the student's assigned
    class; background and ignored read class 0) ``[B, L, 4]``."""
    s = per_location(scores, anchors)  # [B, L, A, K]
    K = s.shape[-1]
    cls = labels.clamp(0, K - 1)[..., None, None].expand(-1, -1, anchors, 1)
    best = torch.gather(s, 3, cls).squeeze(-1).argmax(dim=-1)  # [B, L]
    b = torch.gather(per_location(boxes, anchors), 2, best[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)
    return s.amax(dim=2), b


def student_targets(loss: DetectionLoss, assignment: Assignment, anchors: int,
                    quality_boxes: Tensor | None = None) -> Tensor:
    """The student's classification targets at its locations, ``[B, L, K]``: its family loss's
    :meth:`~kdctl.models.families.family.DetectionLoss.cls_targets` (GFL: IoU-quality at positives,
    computed with ``quality_boxes`` ``[B, L, 4]``; focal-loss heads: one-hot), max over the
    location's priors."""
    pred = None if quality_boxes is None else quality_boxes.repeat_interleave(anchors, dim=1)
    t = loss.cls_targets(assignment, pred)  # [B, N, K]
    return per_location(t, anchors).amax(dim=2)


def discrepancy(ref: Tensor, other: Tensor, floor: float, per_class: bool = False) -> tuple[Tensor, Tensor]:
    """(``d``, non-trivial) of two ``[B, L, K]`` maps in ``[0, 1]``: ``[B, L]`` with
    ``d = max_k |ref - other|`` and ``max(ref) > floor or max(other) > floor``; per class
    ``[B, L, K]`` with ``|ref_k - other_k|`` and ``ref_k > floor or other_k > floor``."""
    ref, other = ref.float(), other.float()
    if per_class:
        return (ref - other).abs(), (ref > floor) | (other > floor)
    return (ref - other).abs().amax(dim=-1), (ref.amax(dim=-1) > floor) | (other.amax(dim=-1) > floor)


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


class ConflictStats:
    """Discrepancy counts of one comparison (e.g. student target vs one teacher) over a dataset.

    ``counts`` int64 ``[2, V, 4, BINS, 2]``: (non-trivial, level, size, bin, ``d > threshold``);
    ``sums`` float64 ``[2, V, 4]``: the sum of ``d`` of those units.
    """

    def __init__(self, num_levels: int, *, threshold: float = 0.5, floor: float = 0.05, per_class: bool = False,
                 device: torch.device | str = "cpu"):
        self.num_levels, self.threshold, self.floor, self.per_class = num_levels, threshold, floor, per_class
        self.counts = torch.zeros(2, num_levels, len(SIZES), BINS, 2, dtype=torch.int64, device=device)
        self.sums = torch.zeros(2, num_levels, len(SIZES), dtype=torch.float64, device=device)

    def add(self, ref: Tensor, other: Tensor, loc: Locations) -> None:
        """Count the units of one batch: ``ref``, ``other`` ``[B, L, K]`` in ``[0, 1]``."""
        d, nontrivial = discrepancy(ref, other, self.floor, self.per_class)
        level = loc.level[None, :].expand_as(loc.size)
        size, valid = loc.size, loc.valid
        if self.per_class:
            K = d.shape[-1]
            level, size, valid = (t[..., None].expand(-1, -1, K) for t in (level, size, valid))
        bins = (d * BINS).floor().clamp_(0, BINS - 1).long()
        group = (nontrivial.long() * self.num_levels + level) * len(SIZES) + size
        index = (group * BINS + bins) * 2 + (d > self.threshold).long()
        index, group, d = index[valid], group[valid], d[valid]
        self.counts += torch.bincount(index, minlength=self.counts.numel()).view_as(self.counts)
        self.sums += torch.bincount(group, weights=d.double(), minlength=self.sums.numel()).view_as(self.sums)

    def summary(self) -> dict:
        """Plain numbers (one host transfer): totals, the 10-bin histograms, conflict ratios
        and mean discrepancy over all counted units and the non-trivial ones, by level and size."""
        c = self.counts.cpu()
        s = self.sums.cpu()

        def block(cnt: Tensor, sm: Tensor) -> dict:  # cnt [2 (nt), BINS, 2], sm [2]
            allc, ntc = cnt.sum(0), cnt[1]
            n_all, n_nt = int(allc.sum()), int(ntc.sum())
            return {
                "counted": n_all, "nontrivial": n_nt,
                "conflict_ratio": {"all": _ratio(int(allc[:, 1].sum()), n_all), "nontrivial": _ratio(int(ntc[:, 1].sum()), n_nt)},
                "mean_discrepancy": {"all": _ratio(float(sm.sum()), n_all), "nontrivial": _ratio(float(sm[1]), n_nt)},
            }

        out = block(c.sum((1, 2)), s.sum((1, 2)))
        out["units"] = "location-class pairs" if self.per_class else "locations"
        out["histogram"] = {"edges": [i / BINS for i in range(BINS + 1)],
                            "all": c.sum((0, 1, 2, 4)).tolist(), "nontrivial": c[1].sum((0, 1, 3)).tolist()}
        out["by_level"] = {name: block(c[:, v].sum(1), s[:, v].sum(1)) for v, name in enumerate(level_names(self.num_levels))}
        out["by_size"] = {name: block(c[:, :, i].sum(1), s[:, :, i].sum(1)) for i, name in enumerate(SIZES)}
        return out


class RegressionStats:
    """IoU between a teacher's decoded box and the assigned GT at the student's positive
    locations: counts int64 ``[V, 3, BINS]`` by (level, small/medium/large, IoU bin) and the
    float64 IoU sums ``[V, 3]``."""

    def __init__(self, num_levels: int, device: torch.device | str = "cpu"):
        self.num_levels = num_levels
        self.counts = torch.zeros(num_levels, 3, BINS, dtype=torch.int64, device=device)
        self.sums = torch.zeros(num_levels, 3, dtype=torch.float64, device=device)

    def add(self, boxes: Tensor, loc: Locations) -> None:
        """``boxes`` ``[B, L, 4]``: the teacher's box at each location (xyxy, resized pixels)."""
        iou = aligned_iou(boxes.float(), loc.boxes.float())
        keep = loc.pos & loc.valid
        level = loc.level[None, :].expand_as(loc.size)[keep]
        group = level * 3 + (loc.size[keep] - 1)
        iou = iou[keep]
        bins = (iou * BINS).floor().clamp_(0, BINS - 1).long()
        self.counts += torch.bincount(group * BINS + bins, minlength=self.counts.numel()).view_as(self.counts)
        self.sums += torch.bincount(group, weights=iou.double(), minlength=self.sums.numel()).view_as(self.sums)

    def summary(self) -> dict:
        c, s = self.counts.cpu(), self.sums.cpu()

        def block(cnt: Tensor, sm: Tensor) -> dict:
            n = int(cnt.sum())
            return {"positives": n, "mean_iou": _ratio(float(sm.sum()), n)}

        out = block(c, s)
        out["histogram"] = c.sum((0, 1)).tolist()
        out["by_level"] = {name: block(c[v], s[v]) for v, name in enumerate(level_names(self.num_levels))}
        out["by_size"] = {name: block(c[:, i], s[:, i]) for i, name in enumerate(SIZES[1:])}
        return out
