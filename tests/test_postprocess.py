"""``postprocess`` (shared by eval and export) on hand-made raw outputs of tiny detectors:
thresholds, class-wise NMS, per-image limits, per-level top-k, clipping, rescaling, centerness,
and against a per-image reference built on ``torchvision.ops.nms``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from kdctl.models.decoders import DeltaDecoder, DistanceDecoder, DistributionDecoder
from kdctl.models.detector import build_detector
from kdctl.models.families import FAMILIES
from kdctl.models.postprocess import Detections, postprocess
from kdctl.recipe import detector_config

K = 3
SIZES = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64 x 64 input, P3-P7 (a neck gives the first num_levels)
STRIDES = [8, 16, 32, 64, 128]
LOW = -20.0  # sigmoid ~ 2e-9: never above a threshold
_MODELS: dict[str, object] = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(head):
    if head not in _MODELS:
        cfg = detector_config(head=head, backbone="test_resnet", fpn_channels=32, feat_channels=32, stacked_convs=2)
        _MODELS[head] = build_detector(cfg, num_classes=K).eval()
    return _MODELS[head]


def level_conv(pred: nn.Module, level: int = 0) -> nn.Conv2d:
    """A head's predictor conv at ``level``: the one conv of a shared predictor, or the level's
    conv of a per-level one (an ``nn.ModuleList``, e.g. yolo's)."""
    return pred[level] if isinstance(pred, nn.ModuleList) else pred


def blank(model, B=2, reg_value=0.0, ctr_logit=30.0):
    """Raw per-level outputs: every class logit LOW; regression ``reg_value`` everywhere; centerness
    logit ``ctr_logit`` (sigmoid 1 by default, so scores are the class scores). One tensor per
    level of the model's neck (``head.num_levels``: P3-P7 for the FPN families, P3-P5 for yolo)."""
    A = model.head.num_anchors
    R = level_conv(model.head.reg_pred).out_channels // A
    sizes = SIZES[:model.head.num_levels]
    out = {"cls": [torch.full((B, A * K, h, w), LOW) for h, w in sizes],
           "reg": [torch.full((B, A * R, h, w), reg_value) for h, w in sizes]}
    if "centerness" in model.head.output_names:
        out["centerness"] = [torch.full((B, A, h, w), ctr_logit) for h, w in sizes]
    return out


def logit(p):
    return math.log(p / (1 - p))


def put(out, b, level, y, x, c, p, a=0):
    """Class ``c`` of anchor ``a`` at cell (y, x) of ``level`` in image ``b`` gets score ``p``."""
    out["cls"][level][b, a * K + c, y, x] = logit(p)


def run(model, out, valid=None, scales=None, score_thr=0.05, nms_iou=None, topk_pre_nms=1000, max_per_image=100):
    B = out["cls"][0].shape[0]
    valid = torch.tensor([[64, 64]] * B) if valid is None else torch.tensor(valid)
    scales = torch.ones(B, 2) if scales is None else torch.tensor(scales, dtype=torch.float32)
    return postprocess(model.decoder, model.flat_outputs(out), model.priors(out), valid, scales, score_thr=score_thr,
                       nms_iou=model.decoder.nms_iou if nms_iou is None else nms_iou,
                       topk_pre_nms=topk_pre_nms, max_per_image=max_per_image)


def rows(det: Detections):
    """[(image, label, score, box)] in output order, rounded for exact comparisons."""
    return [(int(b), int(c), round(float(s), 5), [round(v, 3) for v in bx.tolist()])
            for b, c, s, bx in zip(det.batch_index, det.labels, det.scores, det.boxes)]


# RetinaNet anchor a=3 is ratio 1, scale 2^0: a 32 x 32 square centred at (x*8, y*8) on P3.
SQ = 3


def test_zero_deltas_decode_to_anchors_and_threshold_is_on_the_class_score():
    model = model_for("retinanet")
    out = blank(model, B=1)
    put(out, 0, 0, 4, 3, 1, 0.06, a=SQ)  # kept: 0.06 > 0.05
    put(out, 0, 0, 1, 1, 0, 0.04, a=SQ)  # dropped
    put(out, 0, 1, 2, 2, 2, 0.5, a=4)  # P4, ratio 1, scale 2^(1/3): side 64 * 2^(1/3)
    det = run(model, out)
    # the P4 anchor (side 64 * 2^(1/3) = 80.6 around (32, 32)) is clipped to the 64 x 64 image
    assert rows(det) == [(0, 2, 0.5, [0.0, 0.0, 64.0, 64.0]), (0, 1, 0.06, [8.0, 16.0, 40.0, 48.0])]
    assert det.scores.dtype == torch.float32 and det.labels.dtype == torch.int64


def test_classwise_nms_same_class_suppressed_other_class_kept_as_torchvision():
    model = model_for("retinanet")
    boxes = torch.tensor([[8.0, 16, 40, 48], [16.0, 16, 48, 48]])  # IoU 24*32 / (40*32) = 0.6 > 0.5
    for c2, expect_n in [(0, 1), (2, 2)]:
        out = blank(model, B=1)
        put(out, 0, 0, 4, 3, 0, 0.9, a=SQ)
        put(out, 0, 0, 4, 4, c2, 0.7, a=SQ)
        det = run(model, out)
        assert len(det.scores) == expect_n
        assert rows(det)[0] == (0, 0, 0.9, [8.0, 16.0, 40.0, 48.0])
        scores, labels = torch.tensor([0.9, 0.7]), torch.tensor([0, c2])
        ref_keep = torch.cat([torch.nonzero(labels == c)[:, 0][nms(boxes[labels == c], scores[labels == c], 0.5)]
                              for c in labels.unique()])
        ref_keep = ref_keep[scores[ref_keep].argsort(descending=True)]
        torch.testing.assert_close(det.boxes, boxes[ref_keep])
        torch.testing.assert_close(det.scores, scores[ref_keep])
        assert det.labels.tolist() == [0, c2][: expect_n]
    # a lower IoU threshold than the pair's 0.6 is what suppresses; 0.65 keeps both
    out = blank(model, B=1)
    put(out, 0, 0, 4, 3, 0, 0.9, a=SQ)
    put(out, 0, 0, 4, 4, 0, 0.7, a=SQ)
    assert len(run(model, out, nms_iou=0.65).scores) == 2


def test_images_do_not_suppress_each_other_and_max_per_image_best_first():
    model = model_for("retinanet")
    out = blank(model, B=2)
    # image 0: 4 disjoint squares x 3 classes = 12 candidates with distinct scores
    cells = [(0, 0), (0, 4), (4, 0), (4, 4)]
    p = 0.30
    for (y, x) in cells:
        for c in range(K):
            put(out, 0, 0, y, x, c, p, a=SQ)
            p += 0.05
    # image 1: the very same box and class as image 0's best, and one more
    put(out, 1, 0, 4, 4, 2, 0.85, a=SQ)
    put(out, 1, 0, 0, 0, 1, 0.5, a=SQ)
    det = run(model, out, max_per_image=5)
    got = rows(det)
    assert [r[0] for r in got] == [0] * 5 + [1] * 2
    assert [r[2] for r in got[:5]] == [0.85, 0.8, 0.75, 0.7, 0.65]  # the 5 best of 12, best first
    assert got[0][1:] == (2, 0.85, [16.0, 16.0, 48.0, 48.0])
    assert got[5:] == [(1, 2, 0.85, [16.0, 16.0, 48.0, 48.0]), (1, 1, 0.5, [0.0, 0.0, 16.0, 16.0])]
    assert len(run(model, out, max_per_image=100).scores) == 12 + 2


def test_topk_pre_nms_is_per_level_and_per_image():
    model = model_for("retinanet")
    out = blank(model, B=2)
    for (y, x), p in zip([(0, 0), (0, 4), (4, 0), (4, 4)], [0.3, 0.6, 0.4, 0.2]):
        put(out, 0, 0, y, x, 0, p, a=SQ)  # level 0: best 0.6
    put(out, 0, 1, 0, 0, 1, 0.5, a=SQ)  # level 1 (stride 16, 64-px square at (0, 0))
    put(out, 0, 1, 3, 3, 1, 0.9, a=SQ)  # level 1 best: (48-32, .., 48+32)
    put(out, 1, 0, 4, 4, 0, 0.55, a=SQ)
    put(out, 1, 0, 0, 0, 2, 0.45, a=SQ)
    det = run(model, out, topk_pre_nms=1)
    assert rows(det) == [
        (0, 1, 0.9, [16.0, 16.0, 64.0, 64.0]),
        (0, 0, 0.6, [16.0, 0.0, 48.0, 16.0]),
        (1, 0, 0.55, [16.0, 16.0, 48.0, 48.0]),
    ]
    assert len(run(model, out, topk_pre_nms=1000).scores) == 6 + 2


def test_clip_to_valid_size_then_rescale_to_original_pixels():
    model = model_for("retinanet")
    out = blank(model, B=2)
    for b in range(2):
        put(out, b, 0, 7, 7, 0, 0.9, a=SQ)  # anchor (40, 40, 72, 72)
        put(out, b, 0, 0, 0, 1, 0.8, a=SQ)  # anchor (-16, -16, 16, 16)
    # image 0: valid (h=60, w=50) of the padded 64 x 64; scales (y, x) = (0.5, 0.25)
    det = run(model, out, valid=[[60, 50], [64, 64]], scales=[[0.5, 0.25], [2.0, 1.0]])
    assert rows(det) == [
        (0, 0, 0.9, [160.0, 80.0, 200.0, 120.0]),  # (40, 40, 50, 60) / (0.25, 0.5, 0.25, 0.5)
        (0, 1, 0.8, [0.0, 0.0, 64.0, 32.0]),  # (0, 0, 16, 16)
        (1, 0, 0.9, [40.0, 20.0, 64.0, 32.0]),  # (40, 40, 64, 64), y / 2
        (1, 1, 0.8, [0.0, 0.0, 16.0, 8.0]),
    ]


def test_boxes_empty_after_clipping_are_dropped_before_nms_unless_torchvision():
    """MMDetection's ``_bbox_post_process`` keeps ``w > 0 and h > 0`` (``min_bbox_size=0``);
    torchvision's RetinaNet/FCOS only clip. A box wholly in the padding (x >= the valid width)
    is clipped to zero width: mmdet drops it, and it must not take a slot of ``max_per_image``."""
    model = model_for("retinanet")
    out = blank(model, B=1)
    put(out, 0, 0, 1, 7, 0, 0.95, a=SQ)  # anchor (40, -8, 72, 24): clipped to (40, 0, 40, 24) for w = 40
    put(out, 0, 0, 1, 1, 1, 0.90, a=SQ)  # anchor (-8, -8, 24, 24): (0, 0, 24, 24), kept
    det = run(model, out, valid=[[64, 40]], max_per_image=1)
    assert rows(det) == [(0, 1, 0.9, [0.0, 0.0, 24.0, 24.0])]
    model.decoder.drop_empty = False  # torchvision's rule
    try:
        det = run(model, out, valid=[[64, 40]], max_per_image=1)
    finally:
        model.decoder.drop_empty = True
    assert rows(det) == [(0, 0, 0.95, [40.0, 0.0, 40.0, 24.0])]
    tv = build_detector(detector_config(head="retinanet", backbone="test_resnet", fpn_channels=32, feat_channels=32,
                                       stacked_convs=2, variant={"priors": "torchvision"}), num_classes=K)
    assert tv.decoder.drop_empty is False and model.decoder.drop_empty is True


@pytest.mark.parametrize("head", ["fcos", "atss"])
def test_centerness_multiplies_after_thresholding_on_the_class_score(head):
    model = model_for(head)
    out = blank(model, B=1, reg_value=0.0, ctr_logit=LOW)
    if head == "fcos":
        for level in range(5):
            out["reg"][level][:] = 10.0  # 10 px on every side of the point ((x+.5)*s, (y+.5)*s)
        box_a, box_b = [10.0, 18.0, 30.0, 38.0], [42.0, 42.0, 62.0, 62.0]
    else:  # zero deltas: the 64-px anchor centred at (x*8, y*8), clipped to 64 x 64
        box_a, box_b = [0.0, 0.0, 48.0, 56.0], [16.0, 16.0, 64.0, 64.0]
    put(out, 0, 0, 3, 2, 0, 0.1)  # cls 0.1 passes 0.05; x centerness 0.2 = 0.02 is still kept
    out["centerness"][0][0, 0, 3, 2] = logit(0.2)
    put(out, 0, 0, 6, 6, 1, 0.6)  # 0.6 x 0.5 = 0.3
    out["centerness"][0][0, 0, 6, 6] = 0.0
    put(out, 0, 0, 0, 7, 2, 0.04)  # below the class threshold: dropped whatever its centerness
    out["centerness"][0][0, 0, 0, 7] = 30.0
    det = run(model, out)
    assert rows(det) == [(0, 1, 0.3, box_b), (0, 0, 0.02, box_a)]


def test_gfl_has_no_centerness_and_decodes_the_distribution_mean():
    model = model_for("gfl")
    out = blank(model, B=1)
    n = model.decoder.reg_max + 1
    # level 1 (stride 16), cell (y=2, x=1): anchor centre (16, 32); distances 1, 2, 0.5, 1 strides
    reg = out["reg"][1]
    for side, bins in enumerate([{1: 1.0}, {2: 1.0}, {0: 0.5, 1: 0.5}, {1: 1.0}]):
        reg[0, side * n:(side + 1) * n, 2, 1] = torch.tensor(
            [math.log(bins[i]) if i in bins else -1e4 for i in range(n)])
    put(out, 0, 1, 2, 1, 2, 0.7)
    det = run(model, out)
    assert rows(det) == [(0, 2, 0.7, [0.0, 0.0, 24.0, 48.0])]  # (16-16, 32-32, 16+8, 32+16)


def test_nothing_above_threshold_gives_empty_detections():
    model = model_for("fcos")
    det = run(model, blank(model, B=2))
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0,)
    assert det.labels.shape == (0,) and det.batch_index.shape == (0,)
    assert det.to_coco(torch.tensor([1, 2]), [1, 2, 3]) == []


def test_to_coco_xywh_image_ids_and_category_ids():
    det = Detections(
        batch_index=torch.tensor([0, 1, 1]),
        boxes=torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.5, 1.25, 2.0, 4.0], [5.0, 5.0, 6.0, 9.0]]),
        scores=torch.tensor([0.9, 0.123456789, 0.05]),
        labels=torch.tensor([2, 0, 1]),
    )
    res = det.to_coco(torch.tensor([42, 7]), cat_ids=[1, 5, 90])
    assert res == [
        {"image_id": 42, "category_id": 90, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.9},
        {"image_id": 7, "category_id": 1, "bbox": [0.5, 1.25, 1.5, 2.75], "score": 0.12346},
        {"image_id": 7, "category_id": 5, "bbox": [5.0, 5.0, 1.0, 4.0], "score": 0.05},
    ]
    # through postprocess: original-pixel boxes become xywh with the batch's ids
    model = model_for("retinanet")
    out = blank(model, B=2)
    put(out, 1, 0, 4, 3, 2, 0.9, a=SQ)
    got = run(model, out, scales=[[1.0, 1.0], [0.5, 0.5]]).to_coco(torch.tensor([3, 11]), [10, 20, 30])
    assert got == [{"image_id": 11, "category_id": 30, "bbox": [16.0, 32.0, 64.0, 64.0], "score": 0.9}]


# ------------------------------------------------------------------ reference on random outputs
def ref_decode(head, model, reg, idx, pri):
    """The decoder's rule written out: deltas against anchors (stds by hand, per family), the
    mean of a distance distribution (GFL, yolo), or distances (FCOS)."""
    if isinstance(model.decoder, DeltaDecoder):
        stds = torch.tensor({"retinanet": (1.0, 1.0, 1.0, 1.0), "atss": (0.1, 0.1, 0.2, 0.2)}[head])
        anc = pri.anchors[idx]
        d = reg * stds
        clip = abs(math.log(16 / 1000))
        wh = anc[:, 2:] - anc[:, :2]
        ctr = anc[:, :2] + wh / 2 + d[:, :2] * wh
        wh = wh * d[:, 2:].clamp(-clip, clip).exp()
        return torch.cat([ctr - wh / 2, ctr + wh / 2], 1)
    pts, s = pri.points[idx], pri.stride[idx][:, None]
    if isinstance(model.decoder, DistributionDecoder):  # GFL, yolo: the distribution's mean, in strides
        n = model.decoder.reg_max + 1
        dist = (F.softmax(reg.reshape(-1, 4, n), -1) * torch.arange(n, dtype=torch.float32)).sum(-1) * s
    else:
        dist = reg * s if model.decoder.norm_on_bbox else reg
    return torch.cat([pts - dist[:, :2], pts + dist[:, 2:]], 1)


def reference(head, model, out, valid, scales, score_thr, nms_iou, topk, max_per_image):
    """One image, one level at a time; class-wise torchvision nms; rows (b, label, score, box)."""
    flat = model.flat_outputs(out)
    pri = model.priors(out)
    result = []
    for b in range(flat["cls"].shape[0]):
        boxes, scores, labels = [], [], []
        start = 0
        for n in pri.num_level_priors:
            s = flat["cls"][b, start:start + n].sigmoid().reshape(-1)
            top, i = s.topk(min(topk, s.numel()))
            keep = top > score_thr
            top, i = top[keep], i[keep]
            idx = i // K + start
            box = ref_decode(head, model, flat["reg"][b, idx], idx, pri)
            h, w = valid[b]
            box = torch.stack([box[:, 0].clamp(0, w), box[:, 1].clamp(0, h),
                               box[:, 2].clamp(0, w), box[:, 3].clamp(0, h)], 1)
            if model.decoder.uses_centerness:
                top = top * flat["centerness"][b, idx, 0].sigmoid()
            nonempty = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])  # mmdet min_bbox_size=0
            box, top, i = box[nonempty], top[nonempty], i[nonempty]
            boxes.append(box)
            scores.append(top)
            labels.append(i % K)
            start += n
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = torch.cat([torch.nonzero(labels == c)[:, 0][nms(boxes[labels == c], scores[labels == c], nms_iou)]
                          for c in range(K)])
        keep = keep[scores[keep].argsort(descending=True)][:max_per_image]
        sy, sx = scales[b]
        for j in keep.tolist():
            result.append((b, int(labels[j]), float(scores[j]), (boxes[j] / torch.tensor([sx, sy, sx, sy])).tolist()))
    return result


@pytest.mark.parametrize("head", list(FAMILIES))
def test_random_outputs_match_per_image_reference(head):
    model = model_for(head)
    g = torch.Generator().manual_seed(5)
    out = blank(model, B=2)
    for name, levels in out.items():
        for x in levels:
            if name == "cls":
                x.copy_(torch.randn(x.shape, generator=g) * 1.5 - 3.5)
            elif name == "reg" and isinstance(model.decoder, DistanceDecoder):  # FCOS: distances > 0
                x.copy_(torch.rand(x.shape, generator=g) * 30 + 1)
            elif name == "reg" and isinstance(model.decoder, DistributionDecoder):  # mass on the low bins: boxes of a few strides
                bins = torch.arange(model.decoder.reg_max + 1, dtype=torch.float32).repeat(4)
                x.copy_(torch.randn(x.shape, generator=g) * 2 - 0.8 * bins[None, :, None, None])
            else:
                x.copy_(torch.randn(x.shape, generator=g) * 0.5)
    valid = [[60, 50], [64, 64]]
    scales = [[0.5, 0.25], [1.5, 2.0]]
    kw = dict(score_thr=0.05, nms_iou=model.decoder.nms_iou, max_per_image=20)
    for topk in (7, 1000):
        det = run(model, out, valid=valid, scales=scales, topk_pre_nms=topk, **kw)
        want = reference(head, model, out, valid, scales, kw["score_thr"], kw["nms_iou"], topk, kw["max_per_image"])
        assert len(want) >= 10
        assert det.batch_index.tolist() == [r[0] for r in want]
        assert det.labels.tolist() == [r[1] for r in want]
        torch.testing.assert_close(det.scores, torch.tensor([r[2] for r in want]))
        torch.testing.assert_close(det.boxes, torch.tensor([r[3] for r in want]), rtol=1e-5, atol=1e-4)
