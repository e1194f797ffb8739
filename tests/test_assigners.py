"""Assigners against hand-computed cases, per-image loop references, and batch invariance."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from kdctl.models.assigners import (
    ATSSAssigner,
    FCOSAssigner,
    MaxIoUAssigner,
    pairwise_iof,
    pairwise_iou,
)
from kdctl.models.priors import anchors, grid_points

K = 10  # num_classes in every test: background label is 10


def _pad(gts: list[tuple[list[list[float]], list[int]]], pad_to: int | None = None):
    """Per-image (boxes, labels) -> padded gt_boxes [B, G, 4], gt_labels [B, G], gt_mask [B, G]."""
    G = pad_to or max(1, max(len(l) for _, l in gts))
    boxes = torch.zeros(len(gts), G, 4)
    labels = torch.full((len(gts), G), -1, dtype=torch.int64)
    mask = torch.zeros(len(gts), G, dtype=torch.bool)
    for i, (b, l) in enumerate(gts):
        if l:
            boxes[i, : len(l)] = torch.tensor(b, dtype=torch.float32)
            labels[i, : len(l)] = torch.tensor(l)
            mask[i, : len(l)] = True
    return boxes, labels, mask


def _check_consistent(a, num_classes=K):
    assert a.labels.dtype == torch.int64 and a.gt_index.dtype == torch.int64
    assert torch.equal(a.pos_mask, (a.labels >= 0) & (a.labels < num_classes))
    assert torch.equal(a.pos_mask, a.gt_index >= 0)
    assert a.num_pos.dim() == 0 and int(a.num_pos) == int(a.pos_mask.sum())
    assert (a.boxes[~a.pos_mask] == 0).all()


def test_pairwise_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 7, 2, generator=g) * 50
    b = torch.cat([xy, xy + 1 + torch.rand(2, 7, 2, generator=g) * 30], -1)
    a = b[0, :5] + 3
    out = pairwise_iou(a, b)  # [A, 4] against [B, G, 4] -> [B, A, G]
    assert out.shape == (2, 5, 7)
    for i in range(2):
        torch.testing.assert_close(out[i], box_iou(a, b[i]))
    # IoF: box (0,0,10,10) vs region (5,0,11,10): intersection 50 / own area 100 = 0.5
    assert pairwise_iof(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[5.0, 0, 11, 10]])).item() == 0.5


# ----------------------------------------------------------------------------- max IoU
# Priors and GTs far apart in groups, so every IoU is easy to compute by hand.
MAXIOU_PRIORS = torch.tensor([
    [0, 0, 10, 10],        # P0  IoU(G0) = 1                                   -> pos G0
    [2, 0, 12, 10],        # P1  inter 8*10=80, union 200-80=120 -> 0.667       -> pos G0
    [5, 0, 15, 10],        # P2  inter 50, union 150 -> 0.333 < 0.4             -> background
    [4, 0, 14, 10],        # P3  inter 60, union 140 -> 0.4286 in [0.4, 0.5)    -> ignore
    [40, 40, 50, 50],      # P4  IoU(G1) = 100/200 = 0.5 >= 0.5 (inclusive)     -> pos G1
    [100, 100, 110, 110],  # P5  IoU(G2) = 100/300 = 0.333: low-quality best    -> pos G2
    [195, 200, 205, 210],  # P6  IoU(G3) = 50/(100+200-50) = 0.2  } tied best   -> pos G3
    [215, 200, 225, 210],  # P7  IoU(G3) = 0.2                    } of G3       -> pos G3
    [300, 300, 310, 310],  # P8  IoU(G4) = 0.5, IoU(G5) = 0.333: best of both   -> G5 (last wins)
], dtype=torch.float32)
MAXIOU_GTS = (
    [[0, 0, 10, 10], [40, 40, 50, 60], [100, 100, 110, 130], [200, 200, 220, 210],
     [300, 300, 320, 310], [300, 300, 310, 330]],
    [7, 1, 2, 3, 4, 5],
)


def test_max_iou_by_hand():
    gt_boxes, gt_labels, gt_mask = _pad([MAXIOU_GTS], pad_to=7)
    gt_boxes[0, 6] = torch.tensor([5, 0, 15, 10.0])  # padding equal to background P2 (IoU 1)
    a = MaxIoUAssigner(0.5, 0.4, 0.0)(MAXIOU_PRIORS, gt_boxes, gt_labels, gt_mask, num_classes=K)
    assert a.labels[0].tolist() == [7, 7, K, -1, 1, 2, 3, 3, 5]
    assert a.gt_index[0].tolist() == [0, 0, -1, -1, 1, 2, 3, 3, 5]
    assert a.boxes[0, 8].tolist() == [300, 300, 310, 330]
    assert int(a.num_pos) == 7
    _check_consistent(a)

    # Without low-quality matches: P5..P7 fall back to background (IoU < 0.4), P8 keeps G4.
    a = MaxIoUAssigner(0.5, 0.4, 0.0, match_low_quality=False)(
        MAXIOU_PRIORS, gt_boxes, gt_labels, gt_mask, num_classes=K)
    assert a.labels[0].tolist() == [7, 7, K, -1, 1, K, K, K, 4]


def test_max_iou_ignore_regions():
    # Region (5,0,11,10): IoF P0 = 50/100 = 0.5, P1 = 60/100 = 0.6, P2 = 60/100 = 0.6.
    # P0 and P1 are positive and stay so; background P2 becomes -1. The padded region over P4
    # (mask False) does nothing.
    gt_boxes, gt_labels, gt_mask = _pad([MAXIOU_GTS])
    ignore = torch.tensor([[[5.0, 0, 11, 10], [40, 40, 50, 50]]])
    ignore_mask = torch.tensor([[True, False]])
    a = MaxIoUAssigner()(MAXIOU_PRIORS, gt_boxes, gt_labels, gt_mask, num_classes=K,
                         ignore=ignore, ignore_mask=ignore_mask)
    assert a.labels[0].tolist() == [7, 7, -1, -1, 1, 2, 3, 3, 5]


def test_max_iou_no_gt_is_all_background():
    gt_boxes, gt_labels, gt_mask = _pad([([], [])])
    a = MaxIoUAssigner()(MAXIOU_PRIORS, gt_boxes, gt_labels, gt_mask, num_classes=K)
    assert (a.labels == K).all() and int(a.num_pos) == 0


def _max_iou_reference(priors, boxes, labels, pos_thr=0.5, neg_thr=0.4, min_pos=0.0):
    """mmdet's MaxIoUAssigner for one image, written as its steps, with a loop over GTs."""
    A = priors.shape[0]
    gt_idx = torch.full((A,), -2)  # -2 ignore, -1 negative, >= 0 GT
    if len(labels) == 0:
        return torch.full((A,), K)
    iou = box_iou(boxes, priors)  # [G, A]
    max_iou, arg = iou.max(dim=0)
    gt_idx[(max_iou >= 0) & (max_iou < neg_thr)] = -1
    gt_idx[max_iou >= pos_thr] = arg[max_iou >= pos_thr]
    gt_max = iou.max(dim=1).values
    for g in range(len(labels)):
        if gt_max[g] >= min_pos:
            gt_idx[iou[g] == gt_max[g]] = g
    out = torch.full((A,), -1)
    out[gt_idx == -1] = K
    out[gt_idx >= 0] = labels[gt_idx[gt_idx >= 0]]
    return out


# ----------------------------------------------------------------------------- ATSS
# Level 0: 1 x 4 grid, stride 10, anchors 10 x 10 centred at x = 0, 10, 20, 30 (y = 0).
# Level 1: 1 x 1 grid, stride 20, one 20 x 20 anchor at (0, 0): fewer priors than topk = 2.
ATSS_PRIORS = torch.tensor([
    [-5, -5, 5, 5], [5, -5, 15, 5], [15, -5, 25, 5], [25, -5, 35, 5],  # P0..P3
    [-10, -10, 10, 10],                                               # P4
], dtype=torch.float32)
ATSS_LEVELS = [4, 1]


def test_atss_by_hand_threshold_and_centre_test():
    # G0 = (6,-4,16,5), centre (11, 0.5), area 90.
    #   level-0 distances: P0 11.01, P1 1.118, P2 9.014, P3 19.01 -> candidates P1, P2; level 1: P4
    #   IoU P1: inter 9*9=81, union 100+90-81=109 -> 0.74312
    #   IoU P2: inter 1*9=9,  union 181 -> 0.04972;  IoU P4: inter 4*9=36, union 454 -> 0.07930
    #   mean 0.29071, unbiased std sqrt((0.45241² + 0.24099² + 0.21142²) / 2) = 0.39207
    #   thr 0.68279 -> only P1 passes; P1's centre (10, 0) is inside G0 (l4 t4 r6 b5) -> positive.
    # G1 = (30,0,42,10), centre (36, 5): candidates P3 (7.81), P2 (16.76), P4.
    #   IoU P3 = 5*5 / (100+120-25) = 0.12821, P2 = 0, P4 = 0 -> values (a, 0, 0):
    #   mean a/3, std a/sqrt(3), thr = 0.91068 a = 0.11675 <= a, BUT P3's centre (30, 0) is on
    #   G1's corner (l = t = 0, not > 0.01) -> no positive for G1.
    gt_boxes, gt_labels, gt_mask = _pad([([[6, -4, 16, 5], [30, 0, 42, 10]], [2, 0])], pad_to=3)
    gt_boxes[0, 2] = torch.tensor([5.0, -5, 15, 5])  # padding identical to P1: must not win it
    a = ATSSAssigner(topk=2)(ATSS_PRIORS, gt_boxes, gt_labels, gt_mask, num_classes=K,
                             num_level_priors=ATSS_LEVELS)
    assert a.labels[0].tolist() == [K, 2, K, K, K]
    assert a.gt_index[0].tolist() == [-1, 0, -1, -1, -1]
    _check_consistent(a)

    # G1 moved to (29,-1,41,9): P3's centre is 1 px inside; IoU 36/184 = 0.19565 >= 0.91068 a
    gt_boxes, gt_labels, gt_mask = _pad([([[29, -1, 41, 9]], [4])])
    a = ATSSAssigner(topk=2)(ATSS_PRIORS, gt_boxes, gt_labels, gt_mask, num_classes=K,
                             num_level_priors=ATSS_LEVELS)
    assert a.labels[0].tolist() == [K, K, K, 4, K]


def test_atss_std_is_unbiased():
    # G = (11,-4,21,1), centre (16, -1.5), area 50. Level 0: P2 4.27, P1 6.18 (P3 14.1, P0 16.1);
    # level 1: P4. IoU P2 = 6*5 / (100+50-30) = 0.25, P1 = 4*5 / 130 = 0.15385, P4 = 0.
    # mean 0.13462; squared deviations 0.013314 + 0.000370 + 0.018121 = 0.031805.
    #   unbiased (n-1 = 2, mmdet's Tensor.std): std 0.12610, thr 0.26072 > 0.25 -> no positive
    #   biased   (n = 3):                       std 0.10297, thr 0.23758 -> P2 would be positive
    gt_boxes, gt_labels, gt_mask = _pad([([[11, -4, 21, 1]], [5])])
    a = ATSSAssigner(topk=2)(ATSS_PRIORS, gt_boxes, gt_labels, gt_mask, num_classes=K,
                             num_level_priors=ATSS_LEVELS)
    assert a.labels[0].tolist() == [K] * 5


def test_atss_shared_prior_takes_highest_iou():
    # Ga = (6,-4,16,5) gives P1 (IoU 0.743) as above. Gb = (5.5,-5,15.5,5), centre (10.5, 0):
    #   candidates P1 (0.5), P2 (9.5), P4; IoU P1 = 95/105 = 0.90476, P2 = 5/195 = 0.02564,
    #   P4 = 45/455 = 0.09890; mean 0.34310, std 0.48779, thr 0.83089 -> P1 positive for Gb too.
    # P1 goes to the GT with the higher IoU, Gb (index 1), not to the first one.
    gt_boxes, gt_labels, gt_mask = _pad([([[6, -4, 16, 5], [5.5, -5, 15.5, 5]], [2, 6])])
    a = ATSSAssigner(topk=2)(ATSS_PRIORS, gt_boxes, gt_labels, gt_mask, num_classes=K,
                             num_level_priors=ATSS_LEVELS)
    assert a.gt_index[0].tolist() == [-1, 1, -1, -1, -1]
    assert a.labels[0].tolist() == [K, 6, K, K, K]


def _atss_reference(priors, boxes, labels, num_level_priors, topk=9):
    """mmdet's ATSSAssigner for one image, with loops over GTs and levels."""
    A = priors.shape[0]
    best_iou = torch.full((A,), -math.inf)
    best_gt = torch.full((A,), -1)
    centres = (priors[:, :2] + priors[:, 2:]) / 2
    for g in range(len(labels)):
        box = boxes[g]
        iou = box_iou(priors, box[None])[:, 0]
        dist = (centres - (box[:2] + box[2:]) / 2).norm(dim=1)
        cand, start = [], 0
        for n in num_level_priors:
            cand.append(dist[start:start + n].topk(min(topk, n), largest=False).indices + start)
            start += n
        cand = torch.cat(cand)
        thr = iou[cand].mean() + iou[cand].std()
        for p in cand.tolist():
            c = centres[p]
            inside = min(c[0] - box[0], c[1] - box[1], box[2] - c[0], box[3] - c[1]) > 0.01
            if iou[p] >= thr and inside and iou[p] > best_iou[p]:
                best_iou[p], best_gt[p] = iou[p], g
    out = torch.full((A,), K)
    out[best_gt >= 0] = labels[best_gt[best_gt >= 0]]
    return out


# ----------------------------------------------------------------------------- FCOS
# Level 0: 4 x 8 points, stride 8 at (4 + 8i, 4 + 8j); level 1: 2 x 4 points, stride 16 at
# (8 + 16i, 8 + 16j). Index of level-0 point (x, y): (y - 4) / 8 * 8 + (x - 4) / 8.
FCOS_SIZES, FCOS_STRIDES = [(4, 8), (2, 4)], [8, 16]


def _fcos_points():
    return grid_points(FCOS_SIZES, FCOS_STRIDES, offset=0.5)


def test_fcos_scale_ranges_by_hand():
    # G0 = (0,0,24,16), centre (12, 8). Radius 1.5: level-0 region 12 px around the centre,
    # clipped to G0 = G0 itself; points strictly inside: x in {4,12,20}, y in {4,12}.
    #   max(l,t,r,b): (12,4) -> 12, (12,12) -> 12, all others 20 (> 12).
    #   With ranges ((-1, 12), (16, inf)): (12,4) [index 1] and (12,12) [index 9] (<= 12 inclusive).
    # Level 1: only (8,8) is strictly inside; max(8,8,16,8) = 16 >= 16 (inclusive) -> index 32.
    pts, lvl, stride = _fcos_points()
    gt_boxes, gt_labels, gt_mask = _pad([([[0, 0, 24, 16]], [3])], pad_to=2)
    gt_boxes[0, 1] = torch.tensor([0.0, 0, 64, 32])  # padding covering everything
    assigner = FCOSAssigner(regress_ranges=((-1, 12), (16, math.inf)))
    a = assigner(pts, gt_boxes, gt_labels, gt_mask, num_classes=K, stride=stride, level=lvl)
    assert a.pos_mask[0].nonzero().flatten().tolist() == [1, 9, 32]
    assert (a.labels[0, [1, 9, 32]] == 3).all()
    assert int(a.num_pos) == 3
    _check_consistent(a)


def test_fcos_centre_sampling_region_clipped_to_box():
    # One level, stride 8, 8 x 8 points at 4..60, range (-1, inf).
    # G = (2,2,62,18): centre (32, 10), radius 1.5 * 8 = 12 -> region x (20, 44), y (-2, 22)
    # clipped to the box: y (2, 18). Strictly inside: x in {28, 36}, y in {4, 12} -> 4 points
    # (y = 20 would be in without the clip). Without centre sampling: x in 4..60 (8 values),
    # y in {4, 12} -> 16 points.
    pts, lvl, stride = grid_points([(8, 8)], [8], offset=0.5)
    gt_boxes, gt_labels, gt_mask = _pad([([[2, 2, 62, 18]], [1])])
    kw = dict(num_classes=K, stride=stride, level=lvl)
    a = FCOSAssigner(regress_ranges=((-1, math.inf),))(pts, gt_boxes, gt_labels, gt_mask, **kw)
    got = sorted(tuple(p) for p in pts[a.pos_mask[0]].int().tolist())
    assert got == [(28, 4), (28, 12), (36, 4), (36, 12)]
    a = FCOSAssigner(regress_ranges=((-1, math.inf),), center_sampling=False)(
        pts, gt_boxes, gt_labels, gt_mask, **kw)
    assert int(a.num_pos) == 16


def test_fcos_smallest_area_wins():
    # Big (0,0,64,64) at index 0 contains every point; small (16,16,40,40) at index 1 contains
    # x, y in {20, 28, 36}: those 9 points go to the smaller box, the other 55 to the big one.
    pts, lvl, stride = grid_points([(8, 8)], [8], offset=0.5)
    gt_boxes, gt_labels, gt_mask = _pad([([[0, 0, 64, 64], [16, 16, 40, 40]], [0, 1])])
    a = FCOSAssigner(regress_ranges=((-1, math.inf),), center_sampling=False)(
        pts, gt_boxes, gt_labels, gt_mask, num_classes=K, stride=stride, level=lvl)
    assert int((a.gt_index[0] == 1).sum()) == 9 and int((a.gt_index[0] == 0).sum()) == 55
    inner = (pts[:, 0] > 16) & (pts[:, 0] < 40) & (pts[:, 1] > 16) & (pts[:, 1] < 40)
    assert (a.labels[0][inner] == 1).all() and (a.labels[0][~inner] == 0).all()


def test_fcos_ignore_points_inside_region():
    # Region (40,0,64,32) holds the background level-0 points x in {44,52,60}, y in {4,12,20,28}
    # (12 points) and the level-1 points (56,8), (56,24) (2 points): 14 become -1.
    pts, lvl, stride = _fcos_points()
    gt_boxes, gt_labels, gt_mask = _pad([([[0, 0, 24, 16]], [3])])
    a = FCOSAssigner(regress_ranges=((-1, 12), (16, math.inf)))(
        pts, gt_boxes, gt_labels, gt_mask, num_classes=K, stride=stride, level=lvl,
        ignore=torch.tensor([[[40.0, 0, 64, 32]]]), ignore_mask=torch.tensor([[True]]))
    assert int((a.labels == -1).sum()) == 14 and int(a.num_pos) == 3


def _fcos_reference(points, stride, level, boxes, labels, ranges, radius=1.5):
    """mmdet's FCOSHead._get_targets_single with centre sampling, looping over points."""
    A = points.shape[0]
    out = torch.full((A,), K)
    for p in range(A):
        x, y = points[p].tolist()
        best_area, best = math.inf, -1
        for g in range(len(labels)):
            x1, y1, x2, y2 = boxes[g].tolist()
            cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, float(stride[p]) * radius
            cx1, cy1, cx2, cy2 = max(cx - r, x1), max(cy - r, y1), min(cx + r, x2), min(cy + r, y2)
            inside = min(x - cx1, y - cy1, cx2 - x, cy2 - y) > 0
            m = max(x - x1, y - y1, x2 - x, y2 - y)
            lo, hi = ranges[int(level[p])]
            area = (x2 - x1) * (y2 - y1)
            if inside and lo <= m <= hi and area < best_area:
                best_area, best = area, g
        if best >= 0:
            out[p] = labels[best]
    return out


# ----------------------------------------------------------------------------- random batches
def _random_gts(g, counts, extent=256.0):
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * extent * 0.8
        wh = 4 + torch.rand(n, 2, generator=g) * extent * 0.5
        out.append((torch.cat([xy, xy + wh], -1).tolist(),
                    torch.randint(0, K, (n,), generator=g).tolist()))
    return out


SIZES, STRIDES = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)], [8, 16, 32, 64, 128]


def _run(name, gts, pad_to=None):
    """Run one assigner on a padded batch of (boxes, labels) lists on a 256 x 256 image."""
    gt_boxes, gt_labels, gt_mask = _pad(gts, pad_to)
    if name == "maxiou":
        priors = anchors(SIZES, STRIDES, 4, 3, (0.5, 1.0, 2.0))
        return MaxIoUAssigner()(priors, gt_boxes, gt_labels, gt_mask, num_classes=K)
    if name == "atss":
        priors = anchors(SIZES, STRIDES, 8, 1, (1.0,))
        return ATSSAssigner(9)(priors, gt_boxes, gt_labels, gt_mask, num_classes=K,
                               num_level_priors=[h * w for h, w in SIZES])
    pts, lvl, stride = grid_points(SIZES, STRIDES, offset=0.5)
    return FCOSAssigner(regress_ranges=((-1, 16), (16, 32), (32, 64), (64, 128), (128, math.inf)))(
        pts, gt_boxes, gt_labels, gt_mask, num_classes=K, stride=stride, level=lvl)


@pytest.mark.parametrize("name", ["maxiou", "atss", "fcos"])
def test_batch_equals_each_image_alone(name):
    g = torch.Generator().manual_seed(42)
    gts = _random_gts(g, [3, 0, 7, 1])
    batch = _run(name, gts)
    _check_consistent(batch)
    for i, one in enumerate(gts):
        alone = _run(name, [one])
        for field in ("labels", "gt_index", "boxes", "pos_mask"):
            assert torch.equal(getattr(batch, field)[i], getattr(alone, field)[0]), (name, i, field)
    # extra padding changes nothing either
    wide = _run(name, gts, pad_to=12)
    assert torch.equal(wide.labels, batch.labels) and torch.equal(wide.gt_index, batch.gt_index)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_per_image_references(seed):
    g = torch.Generator().manual_seed(seed)
    gts = _random_gts(g, [5, 12])
    pts, lvl, stride = grid_points(SIZES, STRIDES, offset=0.5)
    ranges = ((-1, 16), (16, 32), (32, 64), (64, 128), (128, math.inf))
    got = {name: _run(name, gts).labels for name in ("maxiou", "atss", "fcos")}
    for i, (b, l) in enumerate(gts):
        b, l = torch.tensor(b), torch.tensor(l)
        ref = _max_iou_reference(anchors(SIZES, STRIDES, 4, 3, (0.5, 1.0, 2.0)), b, l)
        assert torch.equal(got["maxiou"][i], ref)
        ref = _atss_reference(anchors(SIZES, STRIDES, 8, 1, (1.0,)), b, l,
                              [h * w for h, w in SIZES])
        assert torch.equal(got["atss"][i], ref)
        assert (ref < K).sum() > 0  # the case is not vacuous
        ref = _fcos_reference(pts, stride, lvl, b, l, ranges)
        assert torch.equal(got["fcos"][i], ref)
