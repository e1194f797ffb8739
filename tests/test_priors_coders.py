"""Priors (grid points, anchors) and box coders, against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from kdctl.models.coders import (
    ATSS_STDS,
    DeltaXYWHCoder,
    bbox2distance,
    clip_boxes,
    distance2bbox,
    integral,
)
from kdctl.models.priors import FCOS_POINT_OFFSET, anchors, base_anchors, grid_points, num_anchors


# ----------------------------------------------------------------------------- grid points
def test_grid_points_values_level_major_row_major():
    # level 0: 2 rows x 3 cols, stride 8, offset 0 -> x in {0, 8, 16}, y in {0, 8}, x fastest
    # level 1: 1 row x 2 cols, stride 16 -> (0, 0), (16, 0)
    pts, lvl, stride = grid_points([(2, 3), (1, 2)], [8, 16])
    expected = [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8], [0, 0], [16, 0]]
    assert pts.dtype == torch.float32 and lvl.dtype == torch.int64
    assert pts.tolist() == expected
    assert lvl.tolist() == [0] * 6 + [1] * 2
    assert stride.tolist() == [8.0] * 6 + [16.0] * 2


def test_grid_points_fcos_offset_is_cell_centre():
    # MlvlPointGenerator offset 0.5: (x + 0.5) * 8 -> 4, 12; (y + 0.5) * 8 -> 4
    assert FCOS_POINT_OFFSET == 0.5
    pts, _, _ = grid_points([(1, 2)], [8], offset=FCOS_POINT_OFFSET)
    assert pts.tolist() == [[4.0, 4.0], [12.0, 4.0]]


def test_grid_points_match_head_flatten_order():
    # A head output [B, C, H, W] whose channels hold the cell's (x, y) index flattens with
    # permute(0, 2, 3, 1).reshape(B, -1, C); the i-th row must be the i-th point.
    sizes, strides = [(3, 5), (2, 3)], [8, 16]
    flat = []
    for h, w in sizes:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        out = torch.stack([xx, yy])[None].float()  # [1, 2, H, W]
        flat.append(out.permute(0, 2, 3, 1).reshape(1, -1, 2))
    flat = torch.cat(flat, dim=1)[0]
    pts, _, stride = grid_points(sizes, strides, offset=0.5)
    assert torch.equal(pts / stride[:, None] - 0.5, flat)


# ----------------------------------------------------------------------------- anchors
def _mmdet_formula(stride, octave_base_scale, scales_per_octave, ratios):
    """The anchors of one location from mmdet's formula, in float64, ratios outer."""
    out = []
    for r in ratios:
        for i in range(scales_per_octave):
            s = octave_base_scale * 2 ** (i / scales_per_octave)
            w = stride * s / math.sqrt(r)
            h = stride * s * math.sqrt(r)
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float64)


def test_retinanet_base_anchors_location0_stride8():
    # scales 4 * 2**(i/3) = 4, 5.0397, 6.3496; ratio r = h / w: h = 8 s sqrt(r), w = 8 s / sqrt(r).
    # index 0: r=0.5, s=4 -> w = 32 * 1.41421 = 45.2548, h = 32 * 0.70711 = 22.6274
    # index 3: r=1,   s=4 -> 32 x 32
    # index 6: r=2,   s=4 -> w = 22.6274, h = 45.2548
    # index 1: r=0.5, s=5.0397 -> w = 40.3175 * 1.41421 = 57.0175, h = 28.5088
    a = base_anchors(8, 4, 3, (0.5, 1.0, 2.0))
    assert a.shape == (9, 4) and num_anchors(3, (0.5, 1.0, 2.0)) == 9
    torch.testing.assert_close(a[0], torch.tensor([-22.6274, -11.3137, 22.6274, 11.3137]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(a[3], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    torch.testing.assert_close(a[6], torch.tensor([-11.3137, -22.6274, 11.3137, 22.6274]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(a[1], torch.tensor([-28.5088, -14.2544, 28.5088, 14.2544]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(a.double(), _mmdet_formula(8, 4, 3, (0.5, 1.0, 2.0)),
                               atol=1e-5, rtol=1e-6)


def test_retinanet_anchor_grid_order_and_shifts():
    sizes, strides = [(2, 3), (1, 1)], [8, 16]
    a = anchors(sizes, strides, 4, 3, (0.5, 1.0, 2.0))
    assert a.shape == ((6 + 1) * 9, 4)
    base8 = base_anchors(8, 4, 3, (0.5, 1.0, 2.0))
    # location (x=1, y=0) is rows 9..17, shifted by (8, 0); location (x=0, y=1) is rows 27..35
    torch.testing.assert_close(a[:9], base8)
    torch.testing.assert_close(a[9:18], base8 + torch.tensor([8.0, 0, 8, 0]))
    torch.testing.assert_close(a[27:36], base8 + torch.tensor([0, 8.0, 0, 8]))
    # the stride-16 level: base size 16, ratio-1 scale-4 anchor is 64 x 64 around (0, 0)
    torch.testing.assert_close(a[54 + 3], torch.tensor([-32.0, -32.0, 32.0, 32.0]))
    # centres coincide with grid_points(offset=0) repeated k times
    pts, _, _ = grid_points(sizes, strides)
    centres = (a[:, :2] + a[:, 2:]) / 2
    torch.testing.assert_close(centres, pts.repeat_interleave(9, dim=0), atol=1e-5, rtol=0)


def test_atss_anchors_one_per_location():
    # octave_base_scale 8, 1 scale, ratio 1: a 64 x 64 square on stride 8, centred at x * 8
    a = anchors([(1, 2)], [8], 8, 1, (1.0,))
    assert a.tolist() == [[-32.0, -32.0, 32.0, 32.0], [-24.0, -32.0, 40.0, 32.0]]


# ----------------------------------------------------------------------------- delta coder
def test_delta_encode_by_hand():
    # anchor (0,0,10,10): centre (5,5), 10x10; gt (5,5,15,25): centre (10,15), 10x20
    # dx = 5/10 = 0.5, dy = 10/10 = 1, dw = log 1 = 0, dh = log 2 = 0.693147
    anchor, gt = torch.tensor([0.0, 0, 10, 10]), torch.tensor([5.0, 5, 15, 25])
    torch.testing.assert_close(DeltaXYWHCoder().encode(anchor, gt),
                               torch.tensor([0.5, 1.0, 0.0, math.log(2)]))
    # ATSS stds (0.1, 0.1, 0.2, 0.2) divide: (5, 10, 0, 3.465736)
    torch.testing.assert_close(DeltaXYWHCoder(stds=ATSS_STDS).encode(anchor, gt),
                               torch.tensor([5.0, 10.0, 0.0, math.log(2) / 0.2]))


def test_delta_decode_matches_mmdet_docstring_example():
    # delta2bbox's docstring example in mmdet (coders/delta_xywh_bbox_coder.py), max_shape 32x32
    rois = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [5, 5, 5, 5]])
    deltas = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 2, -1], [0.7, -1.9, -0.5, 0.3]])
    expected = torch.tensor([[0.0000, 0.0000, 1.0000, 1.0000],
                             [0.1409, 0.1409, 2.8591, 2.8591],
                             [0.0000, 0.3161, 4.1945, 0.6839],
                             [5.0000, 5.0000, 5.0000, 5.0000]])
    out = DeltaXYWHCoder().decode(rois, deltas, max_shape=(32, 32))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_delta_decode_wh_ratio_clip_and_clip_border():
    # dw = 10 is clamped to |log(16/1000)| = 4.1352 -> w = 10 * 1000/16 = 625 around x = 5:
    # x1 = -307.5, x2 = 317.5, then clipped to [0, W=200]; y untouched in [0, H=100]
    coder = DeltaXYWHCoder()
    anchor = torch.tensor([[0.0, 0, 10, 10]])
    delta = torch.tensor([[0.0, 0, 10, 0]])
    torch.testing.assert_close(coder.decode(anchor, delta), torch.tensor([[-307.5, 0, 317.5, 10]]))
    torch.testing.assert_close(coder.decode(anchor, delta, max_shape=(100, 200)),
                               torch.tensor([[0.0, 0, 200, 10]]))


def test_delta_round_trip_batched():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 500
    anchors_ = torch.cat([xy, xy + 4 + torch.rand(500, 2, generator=g) * 200], -1)  # [A, 4]
    xy = torch.rand(3, 500, 2, generator=g) * 500
    gt = torch.cat([xy, xy + 4 + torch.rand(3, 500, 2, generator=g) * 200], -1)  # [B, A, 4]
    for coder in (DeltaXYWHCoder(), DeltaXYWHCoder(stds=ATSS_STDS)):
        deltas = coder.encode(anchors_, gt)
        assert deltas.shape == (3, 500, 4)
        torch.testing.assert_close(coder.decode(anchors_, deltas), gt, atol=1e-3, rtol=1e-5)


def test_delta_encode_zero_boxes_stay_finite():
    # Assignment.boxes is zeros at background priors; encoding them must not produce inf/NaN.
    d = DeltaXYWHCoder().encode(torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(1, 4))
    assert torch.isfinite(d).all()


def test_clip_boxes_per_image_sizes():
    boxes = torch.tensor([[[-5.0, -5, 80, 80]], [[-5.0, -5, 80, 80]]])  # [B=2, 1, 4]
    sizes = torch.tensor([[50, 60], [100, 30]])  # (h, w) per image
    out = clip_boxes(boxes, sizes)
    assert out.tolist() == [[[0, 0, 60, 50]], [[0, 0, 30, 80]]]


# ----------------------------------------------------------------------------- distances
def test_bbox2distance_by_hand_and_gfl_clamp():
    # point (10, 10), box (0, 5, 40, 12): l = 10, t = 5, r = 30, b = 2
    p, b = torch.tensor([10.0, 10]), torch.tensor([0.0, 5, 40, 12])
    assert bbox2distance(p, b).tolist() == [10, 5, 30, 2]
    # GFL: clamp to [0, reg_max - eps] with mmdet's eps 0.1 -> r = 15.9
    torch.testing.assert_close(bbox2distance(p, b, max_dist=16), torch.tensor([10, 5, 15.9, 2]))
    # a point outside the box gets 0 on the negative sides when clamped
    assert bbox2distance(torch.tensor([50.0, 10]), b, max_dist=16)[2].item() == 0


def test_distance_round_trip():
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(2, 100, 2, generator=g) * 300
    dist = torch.rand(2, 100, 4, generator=g) * 100
    boxes = distance2bbox(pts, dist)
    torch.testing.assert_close(bbox2distance(pts, boxes), dist, atol=1e-4, rtol=0)
    # clipping to the image
    clipped = distance2bbox(pts, dist, max_shape=(200, 250))
    assert clipped[..., 0::2].max() <= 250 and clipped[..., 1::2].max() <= 200
    assert clipped.min() >= 0


# ----------------------------------------------------------------------------- integral
@pytest.mark.parametrize("reg_max", [7, 16])
def test_integral_one_hot_and_uniform(reg_max):
    n = reg_max + 1
    bins = torch.tensor([0, 3, reg_max, 5])
    logits = torch.full((2, 4, n), -1e4)
    logits[0, torch.arange(4), bins] = 1e4  # image 0: one-hot at the bins
    logits[1] = 0.0  # image 1: uniform -> mean of 0..reg_max = reg_max / 2
    out = integral(logits.reshape(2, 4 * n), reg_max)
    assert out.shape == (2, 4)
    torch.testing.assert_close(out[0], bins.float())
    torch.testing.assert_close(out[1], torch.full((4,), reg_max / 2))


def test_integral_rejects_wrong_width():
    with pytest.raises(ValueError, match="4 \\* \\(reg_max \\+ 1\\)"):
        integral(torch.zeros(3, 4 * 17), reg_max=7)
