"""Losses against their formulas, hand-computed numbers and torchvision."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from kdctl.models.losses import (
    centerness_target,
    distribution_focal_loss,
    focal_loss,
    giou_loss,
    iou_loss,
    quality_focal_loss,
    quality_focal_loss_soft,
    weighted_mean,
)

K = 4


def sample(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, K, generator=g) * 3
    labels = torch.tensor([0, 3, K, -1, 2, K])[:n]  # fg, fg, bg, ignore, fg, bg
    scores = torch.rand(n, generator=g)
    return logits, labels, scores


# ------------------------------------------------------------------ focal
def test_focal_equals_torchvision_on_one_hot_and_zero_for_ignored():
    logits, labels, _ = sample()
    target = torch.zeros(6, K)
    target[0, 0] = target[1, 3] = target[4, 2] = 1.0  # bg and ignored rows stay all-zero
    ref = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none")
    out = focal_loss(logits, labels)
    assert out.shape == (6, K)
    valid = labels >= 0
    torch.testing.assert_close(out[valid], ref[valid])
    assert torch.all(out[3] == 0)


def test_focal_batched_shape_equals_flat():
    logits, labels, _ = sample()
    flat = focal_loss(logits, labels)
    torch.testing.assert_close(focal_loss(logits.reshape(2, 3, K), labels.reshape(2, 3)), flat.reshape(2, 3, K))


# ------------------------------------------------------------------ QFL
def qfl_by_hand(logits, labels, scores, beta=2.0):
    """GFL's formula element by element with explicit logs (moderate logits only)."""
    out = torch.zeros_like(logits)
    p = logits.sigmoid()
    for i in range(logits.shape[0]):
        if labels[i] < 0:
            continue
        for k in range(logits.shape[1]):
            if k == labels[i]:
                s = scores[i]
                out[i, k] = -(s * p[i, k].log() + (1 - s) * (1 - p[i, k]).log()) * (s - p[i, k]).abs() ** beta
            else:
                out[i, k] = -(1 - p[i, k]).log() * p[i, k] ** beta
    return out


def test_qfl_matches_gfl_formula():
    logits, labels, scores = sample()
    torch.testing.assert_close(quality_focal_loss(logits, labels, scores), qfl_by_hand(logits, labels, scores))


def test_qfl_with_unit_quality_is_focal_loss():
    """Score 1: QFL(β=2) == focal(γ=2) without α; with α, focal = QFL · (α t + (1 − α)(1 − t))."""
    logits, labels, _ = sample()
    qfl = quality_focal_loss(logits, labels, torch.ones(6), beta=2.0)
    torch.testing.assert_close(qfl, focal_loss(logits, labels, alpha=-1, gamma=2.0))
    t = torch.zeros(6, K)
    t[0, 0] = t[1, 3] = t[4, 2] = 1.0
    torch.testing.assert_close(focal_loss(logits, labels, alpha=0.25), qfl * (0.25 * t + 0.75 * (1 - t)))


def test_qfl_soft_equals_hard_on_one_hot_times_score():
    logits, labels, scores = sample()
    target = torch.zeros(6, K)
    for i, c in enumerate(labels.tolist()):
        if 0 <= c < K:
            target[i, c] = scores[i]
    hard = quality_focal_loss(logits, labels, scores)
    soft = quality_focal_loss_soft(logits, target)
    valid = labels >= 0
    torch.testing.assert_close(hard[valid], soft[valid])


# ------------------------------------------------------------------ DFL
def test_dfl_three_bin_example_by_hand():
    # n = 2 (three bins), S = softmax(log p) = p
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]).log()
    target = torch.tensor([0.3, 1.6])
    expected = torch.tensor(
        [
            -(0.7 * math.log(0.5) + 0.3 * math.log(0.3)),  # y_l = 0, y_r = 1
            -(0.4 * math.log(0.3) + 0.6 * math.log(0.2)),  # y_l = 1, y_r = 2
        ]
    )
    torch.testing.assert_close(distribution_focal_loss(logits, target), expected)
    torch.testing.assert_close(expected, torch.tensor([0.846395, 1.447252]), atol=1e-6, rtol=0)


def test_dfl_minimum_is_two_bin_entropy_with_zero_gradient():
    # y = 1.25: the minimiser puts 0.75 on bin 1 and 0.25 on bin 2; its mean is y
    logits = torch.tensor([[-1e4, math.log(0.75), math.log(0.25)]], requires_grad=True)
    loss = distribution_focal_loss(logits, torch.tensor([1.25]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(loss, torch.tensor([entropy]))
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, torch.zeros(1, 3), atol=1e-6, rtol=0)
    assert abs((logits.softmax(-1) * torch.arange(3.0)).sum().item() - 1.25) < 1e-6
    # integer target, distribution peaked on it: loss -> 0
    peaked = torch.tensor([[0.0, 30.0, 0.0, 0.0]])
    assert distribution_focal_loss(peaked, torch.tensor([1.0])).item() < 1e-10


def test_dfl_keeps_leading_shape():
    logits = torch.randn(2, 5, 4, 17)
    target = torch.rand(2, 5, 4) * 15.99
    out = distribution_focal_loss(logits, target)
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out.reshape(-1), distribution_focal_loss(logits.reshape(-1, 17), target.reshape(-1)))


# ------------------------------------------------------------------ IoU / GIoU
def test_giou_loss_by_hand():
    pred = torch.tensor([[0.0, 0, 1, 1], [0, 0, 4, 4], [1, 1, 5, 3]])
    target = torch.tensor([[2.0, 2, 3, 3], [1, 1, 3, 3], [1, 1, 5, 3]])
    # disjoint: IoU 0, union 2, hull 9 -> GIoU = -7/9, loss 16/9; nested: IoU 4/16 = hull ratio; equal: 0
    torch.testing.assert_close(giou_loss(pred, target), torch.tensor([16 / 9, 0.75, 0.0]))


def test_iou_loss_linear_and_log_by_hand():
    pred = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]])
    target = torch.tensor([[1.0, 0, 3, 2], [5, 5, 6, 6]])
    # overlap 1x2 = 2, union 4 + 4 - 2 = 6 -> IoU 1/3; second pair disjoint
    torch.testing.assert_close(iou_loss(pred, target, mode="linear"), torch.tensor([2 / 3, 1.0]))
    torch.testing.assert_close(iou_loss(pred, target, mode="log"), torch.tensor([math.log(3), -math.log(1e-6)]))
    with pytest.raises(ValueError, match="mode"):
        iou_loss(pred, target, mode="square")


# ------------------------------------------------------------------ centerness
def test_centerness_by_hand():
    # box 8 wide, 4 high; points at its centre, at 1/4 width (l=2, r=6), and outside it
    ltrb = torch.tensor([[4.0, 2, 4, 2], [2, 2, 6, 2], [-1, 2, 9, 2]])
    torch.testing.assert_close(centerness_target(ltrb), torch.tensor([1.0, math.sqrt(1 / 3), 0.0]))


# ------------------------------------------------------------------ numerics
def test_gradients_finite_for_extreme_logits():
    logits = torch.tensor([[50.0, -50, 50, -50], [-50, 50, -50, 50], [50, 50, -50, -50]], requires_grad=True)
    labels = torch.tensor([0, K, 1])
    scores = torch.tensor([0.9, 0.0, 0.2])
    total = (
        focal_loss(logits, labels).sum()
        + quality_focal_loss(logits, labels, scores).sum()
        + quality_focal_loss_soft(logits, torch.full((3, K), 0.5)).sum()
        + distribution_focal_loss(logits, torch.tensor([0.5, 1.0, 2.99])).sum()
    )
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()


def test_weighted_mean():
    zero = torch.zeros(5, K, requires_grad=True)
    out = weighted_mean(zero, avg_factor=torch.tensor(0.0))
    assert torch.isfinite(out) and out.item() == 0.0
    out.backward()
    assert torch.isfinite(zero.grad).all()
    loss = torch.ones(3, K)
    assert weighted_mean(loss, avg_factor=0).item() == 12.0  # clamped to 1
    assert weighted_mean(loss, avg_factor=torch.tensor(0.5), min_factor=1e-6).item() == 24.0
    w = torch.tensor([1.0, 0.0, 0.5])  # per-row weight broadcasts over K
    assert weighted_mean(loss, w, avg_factor=torch.tensor(2.0)).item() == 3.0
    assert weighted_mean(loss, w).item() == pytest.approx(6.0 / 12)
    assert weighted_mean(torch.zeros(0, K)).item() == 0.0
