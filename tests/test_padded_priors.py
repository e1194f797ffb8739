"""Priors in the padding of a batch (MMDetection's valid flags, issue: official-config parity).

An image batched with a larger one sits on a larger canvas. MMDetection's anchor heads (GFL,
ATSS, RetinaNet) give the priors outside the image's own extent (its size padded up to the
divisor) no weight at all: they are assigned neither as positives nor as background, in the
detection losses and in the KD losses. So, with per-image normalisers (one image per batch
here), an image's loss terms must not depend on the canvas it sits on, whatever the network
outputs in the padding. MMDetection's FCOS head has no valid flags: its padded points are
background, and the last test documents that kdctl keeps that.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdctl.distill.prediction import prediction_kd
from kdctl.models.detector import build_detector
from kdctl.recipe import detector_config

K = 3
STRIDES = (8, 16, 32, 64, 128)
SMALL = (64, 96)  # the image's own padded extent (valid 60 x 90, divisor 32)
BIG = (128, 128)  # the canvas of a batch with a 128 x 128 image


pytestmark = pytest.mark.usefixtures("one_thread")


def level_sizes(h, w):
    """Feature sizes of P3-P7 for an ``h x w`` input: ceil(n / 8), then ceil(n / 2) per level
    (stride-2 convs with padding 1)."""
    out = [(-(-h // 8), -(-w // 8))]
    while len(out) < len(STRIDES):
        out.append((-(-out[-1][0] // 2), -(-out[-1][1] // 2)))
    return out


def outputs(model, canvas, base=None, seed=0):
    """Random per-level head outputs for a one-image batch on ``canvas``; with ``base`` (the
    outputs on the image's own extent) the top-left cells are copied from it, so only the
    padding differs."""
    g = torch.Generator().manual_seed(seed)
    A = model.head.num_anchors
    R = model.head.reg_pred.out_channels // A
    chans = {"cls": A * K, "reg": A * R}
    if "centerness" in model.head.output_names:
        chans["centerness"] = A
    out = {name: [torch.randn((1, c, h, w), generator=g) for h, w in level_sizes(*canvas)] for name, c in chans.items()}
    if base is not None:
        for name, levels in out.items():
            for x, b in zip(levels, base[name]):
                x[..., : b.shape[-2], : b.shape[-1]] = b
    return out


def batch():
    """Boxes near every border of the 60 x 90 image, so coarse levels run short of valid priors."""
    boxes = torch.tensor([[[2.3, 3.1, 31.7, 40.9], [50.2, 21.3, 88.9, 59.4], [10.6, 31.2, 85.1, 57.7]]])  # no distance ties
    return SimpleNamespace(boxes=boxes, labels=torch.tensor([[0, 2, 1]]), gt_mask=torch.ones(1, 3, dtype=torch.bool),
                           ignore=torch.zeros(1, 0, 4), ignore_mask=torch.zeros(1, 0, dtype=torch.bool),
                           valid_sizes=torch.tensor([[60, 90]]), pad_sizes=torch.tensor([list(SMALL)]))


def model_for(head):
    cfg = detector_config(head=head, backbone="test_resnet", fpn_channels=32, feat_channels=32, stacked_convs=1)
    return build_detector(cfg, num_classes=K)


def terms(model, student, teacher, b):
    """The detection losses and the family's prediction-KD losses (CrossKD's, on the cross-head
    outputs) of one batch, with the student's assignment."""
    flat, t_flat, priors = model.flat_outputs(student), model.flat_outputs(teacher), model.priors(student)
    a = model.assign(priors, b, flat)
    out = dict(model.detection_loss(flat, priors, a, lambda t: t))
    out.update(prediction_kd(model.family.kd, model.decoder, flat, t_flat, priors, a, prefix="kd"))
    return out, a


@pytest.mark.parametrize("head", ["gfl", "atss", "retinanet"])
def test_an_image_loses_the_same_alone_or_on_a_larger_canvas(head):
    model = model_for(head)
    s_small, t_small = outputs(model, SMALL, seed=1), outputs(model, SMALL, seed=2)
    s_big, t_big = outputs(model, BIG, s_small, seed=3), outputs(model, BIG, t_small, seed=4)
    alone, a_small = terms(model, s_small, t_small, batch())
    padded, a_big = terms(model, s_big, t_big, batch())
    assert int(a_small.num_pos) >= 3 and int(a_big.num_pos) == int(a_small.num_pos)
    assert set(alone) == set(padded) and len(alone) >= 4
    for name in alone:
        torch.testing.assert_close(padded[name], alone[name], rtol=1e-5, atol=1e-7, msg=name)
    # the priors in the padding are -1 (no loss of any kind), never background
    invalid = ~model.priors(s_big).valid_flags(torch.tensor([list(SMALL)]))
    assert invalid.any() and bool((a_big.labels[invalid] == -1).all())

    # the check has teeth: counting the padding as background (the old behaviour) changes the terms
    model.assigner.exclude_padding = False
    old, _ = terms(model, s_big, t_big, batch())
    assert any(not torch.allclose(old[n], alone[n], rtol=1e-4) for n in alone)


def test_atss_candidates_come_from_valid_priors_only():
    """On a level with fewer valid priors than topk (P6: 2 valid of 4 cells), ATSS takes the
    threshold over the valid candidates only (mmdet assigns among the inside anchors)."""
    model = model_for("atss")
    s_small = outputs(model, SMALL, seed=1)
    s_big = outputs(model, BIG, s_small, seed=3)
    _, a_small = terms(model, s_small, outputs(model, SMALL, seed=2), batch())
    _, a_big = terms(model, s_big, outputs(model, BIG, seed=4), batch())
    p_small, p_big = model.priors(s_small), model.priors(s_big)
    # same positives, same GTs, at the same (level, cell)
    key = lambda p, a: sorted(  # noqa: E731
        (int(p.level[i]), int(p.cells[i, 0]), int(p.cells[i, 1]), int(a.gt_index[0, i])) for i in torch.nonzero(a.pos_mask[0])[:, 0])
    assert key(p_small, a_small) == key(p_big, a_big)


def test_fcos_keeps_padded_points_as_background_as_mmdet():
    """MMDetection's FCOSHead computes targets for every point of the batch's feature maps (no
    valid flags), so padded points are negatives of the classification loss; kdctl does the same."""
    model = model_for("fcos")
    s_small = outputs(model, SMALL, seed=1)
    s_big = outputs(model, BIG, s_small, seed=3)
    alone, _ = terms(model, s_small, outputs(model, SMALL, seed=2), batch())
    padded, a_big = terms(model, s_big, outputs(model, BIG, seed=4), batch())
    invalid = ~model.priors(s_big).valid_flags(torch.tensor([list(SMALL)]))
    assert bool((a_big.labels[invalid] == K).all())
    assert not torch.allclose(padded["loss_cls"], alone["loss_cls"])
