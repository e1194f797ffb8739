"""The yolo family: the PAN neck, the per-level head and its tower API, the task-aligned assigner
(hand-worked cases and a per-image loop reference), the losses against their formulas, CrossKD's
gradient paths on per-level towers, feature KD across necks with different levels, and
`kdctl train` / `kdctl distill` on the yolo recipes (shapes, COCO8, raccoon)."""
from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import ROOT, shared
from kdctl.cli import app
from kdctl.distill.crosskd import CrossKD, align_scale
from kdctl.distill.feature import shared_levels
from kdctl.distill.methods import build_distiller
from kdctl.errors import KdctlError
from kdctl.models.decoders import DistributionDecoder
from kdctl.models.detector import build_detector
from kdctl.models.families.yolo import YOLOLoss, ciou_loss, stride_prior_bias
from kdctl.models.necks.pan import PAN, CSPBlock, scaled_depth, scaled_width
from kdctl.models.priors import PriorGenerator, grid_points
from kdctl.models.tal import AlignedAssignment, TaskAlignedAssigner
from kdctl.recipe import DetectorConfig, detector_config, RecipeError, load_recipe, validate_raw
from helpers import run


pytestmark = pytest.mark.usefixtures("one_thread")


def sets(*items):
    return [x for s in items for x in ("--set", s)]


TINY = ["data.shapes.train_images=8", "data.shapes.val_images=4", "data.shapes.image_size=64", "data.short_side=64",
        "data.max_side=64", "data.batch_size=4", "data.num_workers=0", "train.epochs=1", "train.warmup_iters=2",
        "train.log_every=1", "runtime.threads=1", "eval.batch_size=4"]


def yolo_cfg(width=32, **kw) -> DetectorConfig:
    """A yolo detector whose neck has one width (``neck_widths: uniform``), so that the hand-built
    features below fit every level; the pyramid default is tested in test_yolo_pyramid.py."""
    kw.setdefault("yolo", {})
    kw["yolo"] = {"neck_widths": "uniform", **dict(kw["yolo"])}
    return detector_config(head="yolo", backbone="test_resnet", fpn_channels=width, feat_channels=width,
                          stacked_convs=2, **kw)


def gt_batch(boxes, labels, ignore=None):
    """A batch of padded GTs: ``boxes`` list (per image) of xyxy lists; padding where labels are -1."""
    b = torch.tensor(boxes, dtype=torch.float32)
    lab = torch.tensor(labels)
    ign = torch.zeros(b.shape[0], 0, 4) if ignore is None else torch.tensor(ignore, dtype=torch.float32)
    return SimpleNamespace(boxes=b, labels=lab, gt_mask=lab >= 0, ignore=ign,
                           ignore_mask=torch.ones(ign.shape[:2], dtype=torch.bool))


# ============================================================================= neck
def test_width_and_depth_multipliers_give_the_n_s_m_sizes():
    assert [scaled_width(256, w) for w in (0.25, 0.5, 0.75, 1.0)] == [64, 128, 192, 256]
    assert scaled_width(256, 0.3) == 80 and scaled_width(20, 0.1) == 8  # rounded up to 8, at least 8
    assert [scaled_depth(3, d) for d in (0.33, 0.67, 1.0, 0.01)] == [1, 2, 3, 1]


def test_pan_gives_p3_p5_of_one_width_with_csp_blocks_of_the_given_depth():
    pan = PAN([16, 24, 40], 32, depth=2, in_strides=[8, 16, 32])
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4), torch.randn(2, 40, 2, 2)]
    out = pan(feats)
    assert [tuple(x.shape) for x in out] == [(2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    assert (pan.out_channels, pan.num_outs, pan.strides) == (32, 3, [8, 16, 32])
    assert len(pan.top_down4.blocks) == 2 and isinstance(pan.bottom_up5, CSPBlock)
    # BatchNorm + SiLU after every conv, no conv bias
    convs = [m for m in pan.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in pan.modules()) == len(convs)
    # the bottom-up path: P5 depends on C3 (through N3 -> N4 -> N5), P3 on C5 (top-down)
    feats = [f.requires_grad_() for f in feats]
    pan.eval()
    out = pan(feats)
    out[2].sum().backward(retain_graph=True)
    assert feats[0].grad.abs().sum() > 0
    feats[2].grad = None
    out[0].sum().backward()
    assert feats[2].grad.abs().sum() > 0


def test_csp_block_is_two_parts_one_through_the_bottlenecks():
    block = CSPBlock(8, 16, depth=1).eval()
    x = torch.randn(1, 8, 5, 5)
    expect = block.transition(torch.cat([block.blocks(block.part1(x)), block.part2(x)], dim=1))
    torch.testing.assert_close(block(x), expect)
    assert block.part1[0].out_channels == block.part2[0].out_channels == 8


# ============================================================================= head
def test_head_has_its_own_towers_and_predictors_per_level():
    model = build_detector(yolo_cfg(), 3)
    head = model.head
    assert head.per_level and head.num_levels == 3 and head.num_blocks == 2
    assert head.tower("cls", 0) is not head.tower("cls", 1)
    assert head.predictor("reg", 2).kernel_size == (1, 1) and head.predictor("reg", 2).out_channels == 4 * 17
    block = head.tower("reg", 1)[0]
    assert isinstance(block[1], torch.nn.BatchNorm2d) and block[0].bias is None
    with pytest.raises(ValueError, match="pass the level"):
        head.forward_tower(torch.randn(1, 32, 4, 4), "cls", 1)
    # stride-aware prior bias: logit(5 / (K * (640 / s)^2)) per level
    for level, s in enumerate((8, 16, 32)):
        p = 5 / (3 * (640 / s) ** 2)
        assert head.cls_pred[level].bias[0].item() == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert stride_prior_bias(3, 32) > stride_prior_bias(3, 8)


def test_forward_tower_and_forward_from_compose_to_the_forward_on_every_level():
    head = build_detector(yolo_cfg(), 3).head.eval()
    feats = [torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4), torch.randn(2, 32, 2, 2)]
    plain = head(feats)
    for upto in range(3):
        out, mid = head.forward_with_tower(feats, upto)
        for name in plain:
            for a, b in zip(plain[name], out[name]):
                torch.testing.assert_close(a, b)
        assert len(mid["reg"]) == 3
    # pre-activation: block 0 of level 1 is conv -> BN, no SiLU
    x = feats[1]
    block = head.tower("cls", 1)[0]
    torch.testing.assert_close(head.forward_tower(x, "cls", 1, 1), block[1](block[0](x)))
    manual = head.cls_pred[1](F.silu(head.tower("cls", 1)[1](F.silu(block(x)))))
    torch.testing.assert_close(plain["cls"][1], manual)


# ============================================================================= assigner
def test_assigner_hand_worked_single_object():
    """GT (5, 5, 35, 30), class 1; alpha 0.5, beta 6, top 2. Inside: p0, p1, p2, p4 (p3 is outside
    though its box and score are perfect). Metrics t = s^0.5 * u^6: p0 0.5*1 = 0.5, p1 1*(1/64),
    p2 0.8/64, p4 0.2*1 = 0.2 -> positives p0, p4; targets t / 0.5 * max IoU 1: 1.0 and 0.4."""
    points = torch.tensor([[10.0, 10.0], [20.0, 10.0], [30.0, 10.0], [60.0, 60.0], [25.0, 25.0]])
    gt = [5.0, 5.0, 35.0, 30.0]
    half = [5.0, 5.0, 35.0, 17.5]  # IoU 0.5 with the GT (half its area, inside it)
    boxes = torch.tensor([[gt, half, [5.0, 5.0, 20.0, 30.0], gt, gt]])
    s1 = torch.tensor([0.25, 1.0, 0.64, 1.0, 0.04])
    scores = torch.stack([torch.full((5,), 0.9), s1], dim=-1)[None]  # class 0 is not the GT's
    b = gt_batch([[gt]], [[1]])
    a = TaskAlignedAssigner(None, topk=2)(points, scores, boxes, b.boxes, b.labels, b.gt_mask, num_classes=2)
    assert isinstance(a, AlignedAssignment)
    assert a.labels.tolist() == [[1, 2, 2, 2, 1]] and a.gt_index.tolist() == [[0, -1, -1, -1, 0]]
    torch.testing.assert_close(a.scores, torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.4]]))
    assert a.num_pos.item() == 2 and torch.equal(a.boxes[0, 4], torch.tensor(gt))


def test_assigner_shared_point_goes_to_the_highest_iou_object():
    """G0 (0, 0, 40, 40) class 0 and G1 (10, 10, 50, 50) class 1, top 1: both pick p = (25, 25)
    (the others' metrics are far smaller). Its box (10, 10, 45, 45) has IoU 900/1925 with G0 and
    1225/1600 with G1, while its metric is higher for G0 (score 0.9 vs 1e-4): G1 wins by IoU, G0 is
    left without positives, and p's target is G1's max IoU 0.765625."""
    points = torch.tensor([[5.0, 5.0], [25.0, 25.0], [45.0, 45.0]])
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 45.0, 45.0], [40.0, 40.0, 50.0, 50.0]]])
    scores = torch.tensor([[[0.01, 1e-5], [0.9, 1e-4], [1e-5, 1e-5]]])
    b = gt_batch([[[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 50.0, 50.0]]], [[0, 1]])
    a = TaskAlignedAssigner(None, topk=1)(points, scores, boxes, b.boxes, b.labels, b.gt_mask, num_classes=2)
    assert a.labels.tolist() == [[2, 1, 2]] and a.gt_index.tolist() == [[-1, 1, -1]]
    torch.testing.assert_close(a.scores, torch.tensor([[0.0, 0.765625, 0.0]]))


def test_assigner_ignore_regions_padding_and_empty_images():
    points = torch.tensor([[10.0, 10.0], [30.0, 30.0], [50.0, 50.0]])
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0]] * 3] * 2)
    scores = torch.full((2, 3, 2), 0.5)
    # image 0: one GT around p0, ignore regions over p0 and p2 -> p0 stays positive, p2 is ignored;
    # image 1: only a padded GT and a far ignore region -> all background
    b = gt_batch([[[0.0, 0.0, 20.0, 20.0], [0.0] * 4], [[0.0] * 4] * 2], [[0, -1], [-1, -1]],
                 ignore=[[[0.0, 0.0, 21.0, 21.0], [40.0, 40.0, 60.0, 60.0]], [[100.0, 100.0, 110.0, 110.0]] * 2])
    a = TaskAlignedAssigner(None, topk=10)(points, scores, boxes, b.boxes, b.labels, b.gt_mask,
                                           num_classes=2, ignore=b.ignore, ignore_mask=b.ignore_mask)
    assert a.labels.tolist() == [[0, 2, -1], [2, 2, 2]]
    assert a.scores[1].abs().sum() == 0
    no_gts = torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool)
    e = TaskAlignedAssigner(None)(points, scores[:1], boxes[:1], *no_gts, num_classes=2)
    assert e.labels.tolist() == [[2, 2, 2]] and e.scores.shape == (1, 3)


def test_assigner_candidate_with_zero_metric_outranks_points_outside():
    """Top 2 of a GT with two inside points whose boxes miss it (metric 0): both are positive
    (target 0), never the outside points before them."""
    points = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [20.0, 20.0], [22.0, 22.0]])
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0]] * 5])
    b = gt_batch([[[15.0, 15.0, 30.0, 30.0]]], [[0]])
    a = TaskAlignedAssigner(None, topk=2)(points, torch.full((1, 5, 1), 0.5), boxes, b.boxes, b.labels, b.gt_mask,
                                          num_classes=1)
    assert a.labels.tolist() == [[1, 1, 1, 0, 0]] and a.scores.abs().sum() == 0


def _reference_assign(points, scores, boxes, gts, labels, alpha, beta, topk, K, contested=None):
    """TOOD's rule written as a per-image, per-object Python loop (the test's reference);
    ``contested`` (a list) collects the points chosen by several objects whose best metric and
    best IoU disagree."""
    from torchvision.ops import box_iou

    A = points.shape[0]
    out_labels, out_gt, out_score = [], [], []
    for b in range(scores.shape[0]):
        real = [g for g in range(gts.shape[1]) if labels[b, g] >= 0]
        iou = box_iou(boxes[b].double(), gts[b].double())  # [A, G]
        chosen = {}  # point -> list of gts that chose it
        metric = {}
        for g in real:
            x1, y1, x2, y2 = gts[b, g].tolist()
            cands = [i for i in range(A)
                     if min(points[i, 0] - x1, points[i, 1] - y1, x2 - points[i, 0], y2 - points[i, 1]) > 1e-9]
            t = {i: scores[b, i, labels[b, g]].item() ** alpha * iou[i, g].item() ** beta for i in cands}
            metric.update({(i, g): v for i, v in t.items()})
            for i in sorted(cands, key=lambda i: -t[i])[:topk]:
                chosen.setdefault(i, []).append(g)
        owner = {i: max(gs, key=lambda g: (iou[i, g].item(), -g)) for i, gs in chosen.items()}
        if contested is not None:
            contested += [(b, i) for i, gs in chosen.items() if owner[i] != max(gs, key=lambda g: metric[(i, g)])]
        lab, gid, sc = [K] * A, [-1] * A, [0.0] * A
        for g in real:
            mine = [i for i, o in owner.items() if o == g]
            if not mine:
                continue
            t_max = max(metric[(i, g)] for i in mine)
            u_max = max(iou[i, g].item() for i in mine)
            for i in mine:
                lab[i], gid[i], sc[i] = labels[b, g].item(), g, metric[(i, g)] / (t_max + 1e-9) * u_max
        out_labels.append(lab), out_gt.append(gid), out_score.append(sc)
    return torch.tensor(out_labels), torch.tensor(out_gt), torch.tensor(out_score)


@pytest.mark.parametrize("alpha,beta,topk", [(0.5, 6.0, 10), (1.0, 2.0, 5)])
def test_assigner_batched_equals_a_per_image_loop(alpha, beta, topk):
    g = torch.Generator().manual_seed(3)
    points, _, _ = grid_points([(8, 8), (4, 4)], [8, 16], 0.5)
    B, G, K, A = 3, 6, 3, points.shape[0]
    xy = torch.rand(B, G, 2, generator=g) * 30
    wh = torch.rand(B, G, 2, generator=g) * 30 + 10
    gts = torch.cat([xy, (xy + wh).clamp(max=64)], dim=-1)
    labels = torch.randint(0, K, (B, G), generator=g)
    labels[0, 3] = labels[1, 2:] = -1  # padding
    gts[labels < 0] = 0
    centre = points[None] + torch.randn(B, A, 2, generator=g) * 4
    half = torch.rand(B, A, 2, generator=g) * 20 + 4
    boxes = torch.cat([centre - half, centre + half], dim=-1)
    scores = torch.rand(B, A, K, generator=g) * 0.98 + 0.01
    a = TaskAlignedAssigner(None, alpha=alpha, beta=beta, topk=topk)(points, scores, boxes, gts, labels, labels >= 0,
                                                                    num_classes=K)
    contested = []
    lab, gid, sc = _reference_assign(points, scores, boxes, gts, labels, alpha, beta, topk, K, contested)
    assert contested  # the IoU rule for shared points is exercised
    assert torch.equal(a.labels, lab) and torch.equal(a.gt_index, gid)
    assert a.num_pos.item() > 5
    torch.testing.assert_close(a.scores, sc.float(), rtol=1e-4, atol=1e-6)


def test_assigner_without_predictions_uses_the_untrained_heads_boxes():
    model = build_detector(yolo_cfg(), 3)
    priors = PriorGenerator([8, 16, 32], None, 0.5)([(8, 8), (4, 4), (2, 2)], "cpu")
    b = gt_batch([[[4.0, 6.0, 40.0, 30.0]]], [[2]])
    a = model.assigner.assign(priors, b, 3, None)
    assert 0 < a.num_pos.item() <= 10 and set(a.labels[a.pos_mask].tolist()) == {2}
    assert (a.scores[a.pos_mask] > 0).all() and a.scores[a.pos_mask].max() <= 1.0


# ============================================================================= losses
def _ciou_formula(p, t):
    iw = max(0.0, min(p[2], t[2]) - max(p[0], t[0]))
    ih = max(0.0, min(p[3], t[3]) - max(p[1], t[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
    iou = inter / union
    rho2 = ((p[0] + p[2]) / 2 - (t[0] + t[2]) / 2) ** 2 + ((p[1] + p[3]) / 2 - (t[1] + t[3]) / 2) ** 2
    c2 = (max(p[2], t[2]) - min(p[0], t[0])) ** 2 + (max(p[3], t[3]) - min(p[1], t[1])) ** 2
    v = 4 / math.pi ** 2 * (math.atan((t[2] - t[0]) / (t[3] - t[1])) - math.atan((p[2] - p[0]) / (p[3] - p[1]))) ** 2
    alpha = v / ((1 - iou) + v) if v > 0 else 0.0
    return 1 - iou + rho2 / c2 + alpha * v


def test_ciou_loss_matches_zheng_et_al():
    # hand-worked: same aspect ratio (v = 0): 1 - 1/7 + rho^2 2 / c^2 18
    got = ciou_loss(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]]))
    assert got.item() == pytest.approx(1 - 1 / 7 + 2 / 18, rel=1e-5)
    pairs = [([0.0, 0.0, 4.0, 2.0], [1.0, 0.5, 3.0, 5.0]), ([10.0, 10.0, 30.0, 16.0], [12.0, 8.0, 25.0, 20.0]),
             ([0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 9.0, 6.0])]
    got = ciou_loss(torch.tensor([p for p, _ in pairs]), torch.tensor([t for _, t in pairs]))
    torch.testing.assert_close(got, torch.tensor([_ciou_formula(p, t) for p, t in pairs]), rtol=1e-5, atol=1e-6)


def test_yolo_loss_matches_a_per_prior_reference():
    """BCE on the soft targets over every non-ignored prior and class, target-score-weighted CIoU
    and DFL (mean over the 4 sides) at positives, each / the target-score sum, weights 0.5/7.5/1.5."""
    torch.manual_seed(0)
    K, reg_max = 3, 16
    priors = PriorGenerator([8, 16], None, 0.5)([(2, 2), (1, 1)], "cpu")  # 5 points
    N = 5
    decoder = DistributionDecoder(reg_max, 0.7)
    loss_fn = YOLOLoss(K, {"loss_cls": 0.5, "loss_bbox": 7.5, "loss_dfl": 1.5}, decoder, "ciou")
    flat = {"cls": torch.randn(1, N, K), "reg": torch.randn(1, N, 4 * (reg_max + 1))}
    labels = torch.tensor([[1, 3, -1, 0, 3]])
    pos = (labels >= 0) & (labels < K)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 12.0], [0.0] * 4, [0.0] * 4, [2.0, 3.0, 30.0, 28.0], [0.0] * 4]])
    scores = torch.tensor([[0.8, 0.0, 0.0, 0.35, 0.0]])
    a = AlignedAssignment(labels, torch.where(pos, 0, -1), boxes, pos, pos.sum(), scores)
    got = loss_fn(flat, priors, a)

    total = scores.sum().item()  # 1.15
    cls = box = dfl = 0.0
    pred = decoder.decode(flat["reg"], priors)[0]
    for i in range(N):
        if labels[0, i] < 0:
            continue
        for k in range(K):
            y = scores[0, i].item() if labels[0, i] == k else 0.0
            p = torch.sigmoid(flat["cls"][0, i, k]).item()
            cls += -(y * math.log(p) + (1 - y) * math.log(1 - p))
        if not pos[0, i]:
            continue
        w = scores[0, i].item()
        box += w * _ciou_formula(pred[i].tolist(), boxes[0, i].tolist())
        s = priors.stride[i].item()
        px, py = priors.points[i].tolist()
        x1, y1, x2, y2 = boxes[0, i].tolist()
        sides = 0.0
        for side, d in enumerate(((px - x1) / s, (py - y1) / s, (x2 - px) / s, (y2 - py) / s)):
            d = min(max(d, 0.0), reg_max - 0.1)
            logp = torch.log_softmax(flat["reg"][0, i, side * (reg_max + 1):(side + 1) * (reg_max + 1)], dim=0)
            lo = math.floor(d)
            sides += -((lo + 1 - d) * logp[lo].item() + (d - lo) * logp[lo + 1].item())
        dfl += w * sides / 4
    assert got["loss_cls"].item() == pytest.approx(0.5 * cls / total, rel=1e-5)
    assert got["loss_bbox"].item() == pytest.approx(7.5 * box / total, rel=1e-5)
    assert got["loss_dfl"].item() == pytest.approx(1.5 * dfl / total, rel=1e-5)
    # the conflict analysis reads the soft targets
    t = loss_fn.cls_targets(a)
    assert t[0, 0, 1] == pytest.approx(0.8) and t[0, 3, 0] == pytest.approx(0.35) and t.sum() == pytest.approx(1.15)


def test_recipe_fields_reach_the_assigner_and_loss():
    cfg = yolo_cfg(yolo={"tal_alpha": 1.0, "tal_beta": 2.0, "tal_topk": 7, "box_weight": 5.0, "width": 0.5})
    model = build_detector(cfg, 3)
    assert (model.assigner.alpha, model.assigner.beta, model.assigner.topk) == (1.0, 2.0, 7)
    assert model.detection_loss.weights == {"loss_cls": 0.5, "loss_bbox": 5.0, "loss_dfl": 1.5}
    assert model.neck.out_channels == 16 and model.head.feat_channels == 16
    assert model.decoder.nms_iou == 0.7 and model.prior_generator.point_offset == 0.5
    with pytest.raises(RecipeError, match=r"model\.student: yolo applies to the yolo head only, not 'gfl'"):
        validate_raw({"model": {"student": {"head": "gfl", "yolo": {"width": 0.5}}}}, "r.yaml")
    with pytest.raises(RecipeError, match="box_loss 'giou' does not apply to head 'yolo'"):
        validate_raw({"model": {"student": {"head": "yolo", "box_loss": "giou"}}}, "r.yaml")
    # adapter false compares the widths the multipliers give: 256 * 0.25 vs 256 * 0.5
    side = {"head": "yolo", "fpn_channels": 256, "feat_channels": 256, "stacked_convs": 2}
    raw = {"model": {"student": {**side, "yolo": {"width": 0.25}}, "teacher": {**side, "yolo": {"width": 0.5}}},
           "distill": {"losses": [{"type": "pkd", "adapter": False}]}}
    with pytest.raises(RecipeError, match="the student has 64 channels and the teacher 128"):
        validate_raw(raw, "r.yaml")


# ============================================================================= distillation
def pair(teacher_width=32, teacher_head="yolo"):
    torch.manual_seed(0)
    student = build_detector(yolo_cfg(32), 3)
    teacher = build_detector(yolo_cfg(teacher_width) if teacher_head == "yolo" else detector_config(
        head=teacher_head, backbone="test_resnet", fpn_channels=teacher_width, feat_channels=teacher_width,
        stacked_convs=2), 3)
    for p in teacher.parameters():  # a teacher away from its initialisation
        p.data.add_(0.05 * torch.randn_like(p))
    return student, teacher


def image_batch():
    torch.manual_seed(1)
    b = gt_batch([[[4.0, 6.0, 40.0, 30.0], [30.0, 20.0, 60.0, 62.0]], [[10.0, 10.0, 50.0, 60.0], [0.0] * 4]],
                 [[0, 2], [1, -1]])
    b.images = torch.randn(2, 3, 64, 64)
    return b


def crosskd(reuse_idx=None, **kw):
    r = load_recipe("shapes", ["distill.losses=[{type: crosskd}]"])
    return [r.distill.losses[0].model_copy(update={"reuse_idx": reuse_idx, **kw})]


@pytest.mark.parametrize("reuse_idx", [None, 1, 2])
def test_crosskd_gradient_reaches_the_student_only_up_to_reuse_idx(reuse_idx):
    student, teacher = pair()
    d = build_distiller(student, teacher, crosskd(reuse_idx))
    d.train()
    losses = d(image_batch())
    kd = losses["loss_crosskd_cls"] + losses["loss_crosskd_reg"]
    assert torch.isfinite(kd) and kd > 0
    kd.backward()
    idx = 0 if reuse_idx is None else reuse_idx
    grads = {n: p.grad for n, p in student.named_parameters()}

    def has(prefix):
        return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))

    assert has("backbone.") and has("neck.")
    for branch in ("cls", "reg"):
        for level in range(3):
            for i in range(2):
                assert has(f"head.{branch}_tower.{level}.{i}.") == (i < idx), (branch, level, i, idx)
    for name in ("head.cls_pred", "head.reg_pred"):
        assert not has(name), name
    assert all(p.grad is None for p in teacher.parameters())


def test_crosskd_runs_the_teachers_own_level_tower_on_aligned_features():
    student, teacher = pair(48)
    ck = CrossKD(student.head, teacher.head, student.family.kd, student.decoder, reuse_idx=1)
    assert ck.adapters["cls"].weight.shape == (48, 32, 1, 1)  # widths differ: adapters
    images = image_batch().images
    _, s_mid = student.head.forward_with_tower(student.features(images), 1)
    _, t_mid = teacher.head.forward_with_tower(teacher.features(images), 1)
    cross = ck.cross_predictions(s_mid, t_mid, teacher.head)
    level = 2
    x = F.silu(align_scale(ck.adapters["reg"](s_mid["reg"][level]), t_mid["reg"][level]))
    x = F.silu(teacher.head.reg_tower[level][1](x))
    torch.testing.assert_close(cross["reg"][level], teacher.head.reg_pred[level](x))


def test_feature_kd_compares_the_levels_both_necks_have():
    """A P3-P5 yolo student with a P3-P7 GFL teacher: the strides 8/16/32 pairs, explicitly."""
    assert shared_levels([8, 16, 32], [8, 16, 32, 64, 128]) == [(0, 0), (1, 1), (2, 2)]
    assert shared_levels([16, 32], [8, 16, 32]) == [(0, 1), (1, 2)]
    with pytest.raises(KdctlError, match="share no stride"):
        shared_levels([8], [16])
    student, teacher = pair(64, "gfl")
    r = load_recipe("shapes", ["distill.losses=[{type: feat_l2}]"])
    d = build_distiller(student, teacher, r.distill.losses)
    d.train()
    b = image_batch()
    with pytest.warns(UserWarning, match=r"strides \[64, 128\] exist on one side only"):
        losses = d(b)
    method = d.methods["feat_l2"]
    s_feats = student.features(b.images)
    with torch.no_grad():
        t_feats = teacher.features(b.images)
    expect = sum(F.mse_loss(method.adapters[str(i)](s_feats[i]), t_feats[i]) for i in range(3))
    torch.testing.assert_close(losses["loss_feat_l2"], expect)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d(b)  # warned once only


# ============================================================================= CLI
def test_cli_train_yolo_n_on_shapes_then_eval(tmp_path):
    res = run("train", "yolo-n", *sets(*TINY), "--max-steps", "2", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    res = run("eval", tmp_path / "run" / "last.safetensors", "--json", "-")
    assert res.exit_code == 0, res.output


def test_cli_distill_yolo_s_teacher_into_yolo_n_student(tmp_path):
    res = run("train", "yolo-n", "--model", "teacher", *sets(*TINY), "--max-steps", "1", "--out", tmp_path / "teacher")
    assert res.exit_code == 0, res.output
    res = run("distill", "yolo-n", "--teacher", tmp_path / "teacher" / "last.safetensors", "--method",
              "crosskd,pkd,pred_mimic", *sets(*TINY), "--max-steps", "2", "--out", tmp_path / "student", "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*(r for r in rows if r["kind"] == "train"))
    for name in ("loss_crosskd_cls", "loss_crosskd_reg", "loss_pkd", "loss_mimic_cls", "loss_cls", "loss_bbox",
                 "loss_dfl"):
        assert name in logged, name
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "train")


def test_cli_gfl_teacher_into_yolo_student_with_ssim(tmp_path):
    gfl = ["model.student.head=gfl", "model.student.backbone=test_resnet", "model.student.fpn_channels=32",
           "model.student.feat_channels=32", "model.student.stacked_convs=2", "model.student.yolo={}"]
    res = run("train", "yolo-n", *sets(*TINY, *gfl), "--max-steps", "1", "--out", tmp_path / "gfl")
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "gfl" / "last.safetensors"
    with pytest.warns(UserWarning, match=r"ssim: .*strides \[64, 128\] exist on one side only"):
        res = run("distill", "yolo-n", "--teacher", ckpt, "--method", "ssim", *sets(*TINY), "--max-steps", "1",
                  "--out", tmp_path / "student")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "student" / "last.safetensors").is_file()
    # prediction methods need the same head: one line
    res = run("distill", "yolo-n", "--teacher", ckpt, "--method", "crosskd", *sets(*TINY), "--max-steps", "1",
              "--out", tmp_path / "x")
    assert res.exit_code == 2 and "same head" in res.output


def test_cli_yolo_on_coco8_and_raccoon(tmp_path, monkeypatch):
    shared("coco8")
    shared("raccoon-voc")
    monkeypatch.chdir(ROOT)  # the built-in recipes name ../shared/data relative to the repository
    small = ["data.short_side=64", "data.max_side=96", "data.batch_size=2", "data.num_workers=0", "runtime.threads=1",
             "train.epochs=1", "train.warmup_iters=1", "eval.batch_size=2"]
    res = run("train", "yolo-coco8", *sets(*small), "--max-steps", "1", "--out", tmp_path / "coco8")
    assert res.exit_code == 0, res.output
    res = run("train", "yolo-raccoon", "--model", "teacher", *sets(*small), "--max-steps", "1", "--out", tmp_path / "t")
    assert res.exit_code == 0, res.output
    res = run("distill", "yolo-raccoon", "--teacher", tmp_path / "t" / "last.safetensors", "--method", "crosskd,ssim",
              *sets(*small), "--max-steps", "1", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
