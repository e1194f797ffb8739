"""The families' losses (RetinaNet, ATSS, GFL, FCOS, yolo: prior generator + assigner + decoder +
loss, as a detector gets them) against straightforward references, and the Detector's
flattening of per-level outputs into prior order.

The references below index the positives of each image with a boolean mask and write every
formula out (MMDetection's ``retina_head``/``atss_head``/``gfl_head``/``fcos_head``; the yolo
family's BCE + CIoU + DFL from its papers): nothing of kdctl is reused except the assignment
itself, which ``test_assigners.py`` checks.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdctl.data.collate import collate
from conftest import family_loss, family_parts
from kdctl.models.decoders import DistanceDecoder, DistributionDecoder
from kdctl.models.detector import build_detector
from kdctl.models.families import FAMILIES
from kdctl.recipe import detector_config

FPN_STRIDES = (8, 16, 32, 64, 128)
K = 3
IMG = 128
SIZES = [(IMG // s, IMG // s) for s in FPN_STRIDES]  # (16,16) (8,8) (4,4) (2,2) (1,1)
EXPECTED_NAMES = {
    "retinanet": {"loss_cls", "loss_bbox"},
    "atss": {"loss_cls", "loss_bbox", "loss_centerness"},
    "gfl": {"loss_cls", "loss_bbox", "loss_dfl"},
    "fcos": {"loss_cls", "loss_bbox", "loss_centerness"},
    "yolo": {"loss_cls", "loss_bbox", "loss_dfl"},
}


def strides_of(head):
    """The strides of ``head``'s neck: P3 on, ``Family.neck_levels`` of them (P3-P7 for the FPN families)."""
    return FPN_STRIDES[:FAMILIES[head].neck_levels]


def sizes_of(head):
    """The level sizes of an ``IMG`` input for ``head``'s neck (:func:`strides_of`)."""
    return SIZES[:FAMILIES[head].neck_levels]

# image 0: three objects of different sizes/classes; image 1 varies per case
GTS0 = ([[10, 12, 60, 50], [70, 64, 120, 126], [30, 80, 46, 98]], [0, 2, 1])
GTS1 = {
    "uneven": ([[20, 20, 90, 70]], [1]),  # one GT: padded with two rows (label -1, gt_mask False)
    "empty": ([], []),  # no GT at all
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(per_image, ignore=None, size=IMG):
    """A collated Batch of images of ``size`` with ``per_image`` = [(boxes, labels), ...]."""
    samples = []
    for i, (boxes, labels) in enumerate(per_image):
        ign = (ignore or {}).get(i, [])
        samples.append({
            "image": torch.zeros(3, size, size),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64).reshape(-1),
            "ignore": torch.tensor(ign, dtype=torch.float32).reshape(-1, 4),
            "ignore_labels": torch.zeros(len(ign), dtype=torch.int64),
            "image_id": 100 + i,
            "orig_size": (size, size),
        })
    return collate(samples, pad_divisor=32)


def make_criterion(head, box_loss="auto", **kw):
    """The family's parts for its neck's levels (:func:`strides_of`: P3-P7 for the FPN
    families, P3-P5 for yolo's PAN): prior generator, assigner, decoder, loss."""
    return family_parts(head, K, strides_of(head), box_loss, **kw)


def random_outputs(head, crit, priors, B=2, seed=0, norm_on_bbox=False, requires_grad=False):
    """Flattened outputs ``{"cls": [B, N, K], "reg": [B, N, R], ("centerness": [B, N, 1])}``, the
    regression of the kind the family's decoder reads (``head`` is not read: the parts say)."""
    g = torch.Generator().manual_seed(seed)
    N = priors.points.shape[0]
    out = {"cls": torch.randn(B, N, K, generator=g) * 2 - 2}
    if isinstance(crit.decoder, DistributionDecoder):  # GFL, yolo: 4 x (reg_max + 1) bin logits
        out["reg"] = torch.randn(B, N, 4 * (crit.decoder.reg_max + 1), generator=g)
    elif isinstance(crit.decoder, DistanceDecoder):  # FCOS
        # distances >= 0 as the head returns them: pixels, or strides with norm_on_bbox
        r = torch.rand(B, N, 4, generator=g)
        out["reg"] = r * 4 + 0.2 if norm_on_bbox else r * 40 + 2
    else:  # deltas against anchors (RetinaNet, ATSS)
        out["reg"] = torch.randn(B, N, 4, generator=g) * 0.5
    if "loss_centerness" in crit.loss.weights:  # ATSS, FCOS
        out["centerness"] = torch.randn(B, N, 1, generator=g)
    if requires_grad:
        out = {k: v.requires_grad_() for k, v in out.items()}
    return out


# ------------------------------------------------------------------ reference formulas
def ref_focal_sum(logits, labels, alpha=0.25, gamma=2.0):
    """Sum of the sigmoid focal loss of rows ``logits [M, K]`` with labels in [0, K] (K = bg)."""
    t = F.one_hot(labels, K + 1)[:, :K].float()
    p = logits.sigmoid()
    ce = -(t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits))
    p_t = t * p + (1 - t) * (1 - p)
    a_t = t * alpha + (1 - t) * (1 - alpha)
    return (a_t * (1 - p_t) ** gamma * ce).sum()


def ref_qfl_sum(logits, labels, iou, beta=2.0):
    """GFL's QFL: negatives ``BCE(σ, 0) σ^β``, the positive class ``BCE(σ, s) |s − σ|^β``."""
    t = F.one_hot(labels, K + 1)[:, :K].float() * iou[:, None]
    p = logits.sigmoid()
    ce = -(t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits))
    return (ce * (t - p).abs() ** beta).sum()


def area(b):
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def ref_iou(a, b):
    w = (torch.min(a[:, 2], b[:, 2]) - torch.max(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.min(a[:, 3], b[:, 3]) - torch.max(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    return inter / (area(a) + area(b) - inter)


def ref_giou_loss(a, b):
    w = (torch.min(a[:, 2], b[:, 2]) - torch.max(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.min(a[:, 3], b[:, 3]) - torch.max(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    union = area(a) + area(b) - inter
    cw = torch.max(a[:, 2], b[:, 2]) - torch.min(a[:, 0], b[:, 0])
    ch = torch.max(a[:, 3], b[:, 3]) - torch.min(a[:, 1], b[:, 1])
    enclose = cw * ch
    return 1 - (inter / union - (enclose - union) / enclose)


def ref_encode(anchors, gt, stds):
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    px, py = anchors[:, 0] + pw / 2, anchors[:, 1] + ph / 2
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + gw / 2, gt[:, 1] + gh / 2
    d = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], 1)
    return d / torch.tensor(stds)


def ref_decode(anchors, deltas, stds):
    d = deltas * torch.tensor(stds)
    clip = abs(math.log(16 / 1000))
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    px, py = anchors[:, 0] + pw / 2, anchors[:, 1] + ph / 2
    x, y = px + d[:, 0] * pw, py + d[:, 1] * ph
    w, h = pw * d[:, 2].clamp(-clip, clip).exp(), ph * d[:, 3].clamp(-clip, clip).exp()
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], 1)


def ref_ciou_loss(a, b):
    """CIoU loss (Zheng et al.): ``1 - IoU + rho^2 / c^2 + alpha v``, ``v = 4 / pi^2 (atan(w_b /
    h_b) - atan(w_a / h_a))^2``, ``alpha = v / (1 - IoU + v)`` taken as a constant."""
    iou = ref_iou(a, b)
    cw = torch.max(a[:, 2], b[:, 2]) - torch.min(a[:, 0], b[:, 0])
    ch = torch.max(a[:, 3], b[:, 3]) - torch.min(a[:, 1], b[:, 1])
    rho2 = ((a[:, :2] + a[:, 2:]) / 2 - (b[:, :2] + b[:, 2:]) / 2).pow(2).sum(1)
    wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    wb, hb = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    v = 4 / math.pi ** 2 * (torch.atan(wb / hb) - torch.atan(wa / ha)) ** 2
    alpha = (v / (1 - iou + v)).detach()
    return 1 - iou + rho2 / (cw ** 2 + ch ** 2) + alpha * v


def ref_centerness(pts, gt):
    l, t = pts[:, 0] - gt[:, 0], pts[:, 1] - gt[:, 1]
    r, b = gt[:, 2] - pts[:, 0], gt[:, 3] - pts[:, 1]
    return torch.sqrt(torch.min(l, r) / torch.max(l, r) * torch.min(t, b) / torch.max(t, b))


def ref_dfl(logits, y):
    """``-((y_r - y) log S_l + (y - y_l) log S_r)``; logits ``[M, n+1]``, y ``[M]``."""
    logp = F.log_softmax(logits, dim=-1)
    lo = y.floor().long()
    w_lo, w_hi = (lo + 1).float() - y, y - lo.float()
    return -(w_lo * logp.gather(1, lo[:, None])[:, 0] + w_hi * logp.gather(1, lo[:, None] + 1)[:, 0])


def reference(head, crit, out, priors, batch, reduce=lambda t: t, box_loss="auto", norm_on_bbox=False):
    """Per-image loops with boolean indexing of the positives, mmdet's formulas."""
    a = crit.assigner.assign(priors, batch, K)
    sums = dict(cls=0.0, box=0.0, dfl=0.0, ctr=0.0, w=0.0)
    num_pos = 0
    for b in range(out["cls"].shape[0]):
        lab = a.labels[b]
        valid, pos = lab >= 0, (lab >= 0) & (lab < K)
        num_pos += int(pos.sum())
        gt = batch.boxes[b][a.gt_index[b][pos]]
        assert torch.equal(batch.labels[b][a.gt_index[b][pos]], lab[pos])
        cls = out["cls"][b].float()
        reg = out["reg"][b][pos].float()
        if head == "retinanet":
            sums["cls"] = sums["cls"] + ref_focal_sum(cls[valid], lab[valid])
            anchors = priors.anchors[pos]
            if box_loss == "giou":
                sums["box"] = sums["box"] + ref_giou_loss(ref_decode(anchors, reg, (1.0,) * 4), gt).sum()
            else:
                sums["box"] = sums["box"] + (reg - ref_encode(anchors, gt, (1.0,) * 4)).abs().sum()
        elif head == "atss":
            sums["cls"] = sums["cls"] + ref_focal_sum(cls[valid], lab[valid])
            anchors = priors.anchors[pos]
            centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # mmdet: from the anchor centre
            ctr_t = ref_centerness(centres, gt)
            pred = ref_decode(anchors, reg, (0.1, 0.1, 0.2, 0.2))
            sums["box"] = sums["box"] + (ctr_t * ref_giou_loss(pred, gt)).sum()
            sums["w"] = sums["w"] + ctr_t.sum()
            ctr_logit = out["centerness"][b][pos][:, 0]
            sums["ctr"] = sums["ctr"] + F.binary_cross_entropy_with_logits(ctr_logit, ctr_t, reduction="sum")
        elif head == "gfl":
            n = crit.decoder.reg_max + 1
            anchors = priors.anchors[pos]
            pts, s = (anchors[:, :2] + anchors[:, 2:]) / 2, priors.stride[pos][:, None]  # mmdet anchor_center
            prob = F.softmax(reg.reshape(-1, 4, n), dim=-1)
            dist = (prob * torch.arange(n, dtype=torch.float32)).sum(-1) * s
            pred = torch.cat([pts - dist[:, :2], pts + dist[:, 2:]], 1)
            iou = torch.zeros(lab.shape[0])
            iou[pos] = ref_iou(pred.detach(), gt)
            sums["cls"] = sums["cls"] + ref_qfl_sum(cls[valid], lab[valid], iou[valid])
            w = cls[pos].detach().sigmoid().max(dim=-1).values
            sums["box"] = sums["box"] + (w * ref_giou_loss(pred, gt)).sum()
            corners = torch.cat([pts / s - gt[:, :2] / s, gt[:, 2:] / s - pts / s], 1).clamp(0, crit.decoder.reg_max - 0.1)
            dfl = ref_dfl(reg.reshape(-1, n), corners.reshape(-1)).reshape(-1, 4)
            sums["dfl"] = sums["dfl"] + (w[:, None] * dfl).sum()
            sums["w"] = sums["w"] + w.sum()
        elif head == "yolo":
            n = crit.decoder.reg_max + 1
            score = a.scores[b]  # TOOD's normalised alignment metric at positives: the target
            t = F.one_hot(lab.clamp(min=0), K + 1)[:, :K].float() * score[:, None]
            x = cls[valid]
            sums["cls"] = sums["cls"] - (t[valid] * F.logsigmoid(x) + (1 - t[valid]) * F.logsigmoid(-x)).sum()
            pts, s = priors.points[pos], priors.stride[pos][:, None]  # cell centres (offset 0.5)
            prob = F.softmax(reg.reshape(-1, 4, n), dim=-1)
            dist = (prob * torch.arange(n, dtype=torch.float32)).sum(-1) * s
            pred = torch.cat([pts - dist[:, :2], pts + dist[:, 2:]], 1)
            w = score[pos]
            sums["box"] = sums["box"] + (w * ref_ciou_loss(pred, gt)).sum()
            corners = torch.cat([pts / s - gt[:, :2] / s, gt[:, 2:] / s - pts / s], 1).clamp(0, crit.decoder.reg_max - 0.1)
            dfl = ref_dfl(reg.reshape(-1, n), corners.reshape(-1)).reshape(-1, 4).mean(-1)  # mean over the sides
            sums["dfl"] = sums["dfl"] + (w * dfl).sum()
            sums["w"] = sums["w"] + w.sum()
        elif head == "fcos":
            sums["cls"] = sums["cls"] + ref_focal_sum(cls[valid], lab[valid])
            pts = priors.points[pos]
            dist = reg * priors.stride[pos][:, None] if norm_on_bbox else reg
            pred = torch.cat([pts - dist[:, :2], pts + dist[:, 2:]], 1)
            ctr_t = ref_centerness(pts, gt)
            box = ref_giou_loss(pred, gt) if box_loss == "giou" else -ref_iou(pred, gt).clamp(min=1e-6).log()
            sums["box"] = sums["box"] + (ctr_t * box).sum()
            sums["w"] = sums["w"] + ctr_t.sum()
            ctr_logit = out["centerness"][b][pos][:, 0]
            sums["ctr"] = sums["ctr"] + F.binary_cross_entropy_with_logits(ctr_logit, ctr_t, reduction="sum")
    npos = reduce(torch.tensor(float(num_pos))).clamp(min=1.0)
    res = {"loss_cls": sums["cls"] / npos}
    if head == "retinanet":
        res["loss_bbox"] = sums["box"] / npos * (2.0 if box_loss == "giou" else 1.0)
    elif head == "atss":
        res["loss_bbox"] = 2.0 * sums["box"] / reduce(torch.as_tensor(sums["w"])).clamp(min=1.0)
        res["loss_centerness"] = sums["ctr"] / npos
    elif head == "gfl":
        wsum = reduce(torch.as_tensor(sums["w"])).clamp(min=1.0)
        res["loss_bbox"] = 2.0 * sums["box"] / wsum
        res["loss_dfl"] = 0.25 * sums["dfl"] / 4.0 / wsum
    elif head == "yolo":  # every term by the sum of the target scores, at least 1; weights 0.5 / 7.5 / 1.5
        wsum = reduce(torch.as_tensor(sums["w"])).clamp(min=1.0)
        res["loss_cls"] = 0.5 * sums["cls"] / wsum
        res["loss_bbox"] = 7.5 * sums["box"] / wsum
        res["loss_dfl"] = 1.5 * sums["dfl"] / wsum
    else:  # mmdet fcos: centerness_denorm = max(reduce_mean(sum), 1e-6)
        res["loss_bbox"] = sums["box"] / reduce(torch.as_tensor(sums["w"])).clamp(min=1e-6)
        res["loss_centerness"] = sums["ctr"] / npos
    return res, num_pos


CASES = [
    ("retinanet", "auto", {}),
    ("retinanet", "giou", {}),
    ("atss", "auto", {}),
    ("gfl", "auto", {}),
    ("fcos", "auto", {}),
    ("fcos", "giou", {}),
    ("fcos", "auto", {"norm_on_bbox": True}),
    ("yolo", "auto", {}),
]


def _id(case):
    head, box_loss, kw = case
    return "-".join([head, box_loss] + [k for k, v in kw.items() if v])


def assert_losses_close(got, want):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], torch.as_tensor(want[name], dtype=torch.float32),
                                   rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("image1", sorted(GTS1))
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_loss_matches_reference(case, image1):
    head, box_loss, kw = case
    crit = make_criterion(head, box_loss, **kw)
    priors = crit.prior_generator(sizes_of(head), torch.device("cpu"))
    batch = make_batch([GTS0, GTS1[image1]])
    norm = kw.get("norm_on_bbox", False)
    out = random_outputs(head, crit, priors, seed=1, norm_on_bbox=norm)
    got = family_loss(crit, out, priors, batch)
    want, num_pos = reference(head, crit, out, priors, batch, box_loss=box_loss, norm_on_bbox=norm)
    assert num_pos >= 3  # the comparison is about real positives, in both images where they exist
    assert set(got) == EXPECTED_NAMES[head]
    assert_losses_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_reduce_is_applied_to_the_averaging_factors(case):
    """A reduce that doubles every averaging factor halves every term (factors are above their
    clamps here), and equals the reference with the doubled factors."""
    head, box_loss, kw = case
    crit = make_criterion(head, box_loss, **kw)
    priors = crit.prior_generator(sizes_of(head), torch.device("cpu"))
    batch = make_batch([GTS0, GTS1["uneven"]])
    out = random_outputs(head, crit, priors, seed=2, norm_on_bbox=kw.get("norm_on_bbox", False))
    plain = family_loss(crit, out, priors, batch)
    seen = []

    def double(t):
        seen.append(t.detach().clone())
        return t * 2

    doubled = family_loss(crit, out, priors, batch, reduce=double)
    want, _ = reference(head, crit, out, priors, batch, reduce=lambda t: t * 2, box_loss=box_loss,
                        norm_on_bbox=kw.get("norm_on_bbox", False))
    assert_losses_close(doubled, want)
    assert seen and all(float(t) >= 1.0 for t in seen)  # no clamp interferes with the halving
    for name in plain:
        torch.testing.assert_close(doubled[name] * 2, plain[name], msg=name)


@pytest.mark.parametrize("head", list(FAMILIES))
@pytest.mark.parametrize("batch_kind", ["one_empty", "all_empty"])
def test_no_gt_losses_and_gradients_are_finite(head, batch_kind):
    crit = make_criterion(head)
    priors = crit.prior_generator(sizes_of(head), torch.device("cpu"))
    per_image = [GTS0, ([], [])] if batch_kind == "one_empty" else [([], []), ([], [])]
    batch = make_batch(per_image)
    out = random_outputs(head, crit, priors, seed=3, requires_grad=True)
    losses = family_loss(crit, out, priors, batch)
    assert set(losses) == EXPECTED_NAMES[head]
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name, t in out.items():
        assert torch.isfinite(t.grad).all(), name
        # the empty image gets gradient only through its classification (all background)
        if name != "cls":
            assert torch.all(t.grad[1] == 0), name
    if batch_kind == "all_empty":
        assert float(losses["loss_cls"].detach()) > 0
        for name in EXPECTED_NAMES[head] - {"loss_cls"}:
            assert float(losses[name].detach()) == 0.0, name
        want, num_pos = reference(head, crit, out, priors, batch)
        assert num_pos == 0
        assert_losses_close(losses, want)


IGNORE = {1: [[0, 0, 72, 72]]}  # image 1: a crowd region over its top-left corner


@pytest.mark.parametrize("head", list(FAMILIES))
def test_ignore_region_priors_contribute_no_loss(head):
    crit = make_criterion(head)
    priors = crit.prior_generator(sizes_of(head), torch.device("cpu"))
    batch = make_batch([GTS0, GTS1["uneven"]], ignore=IGNORE)
    plain_batch = make_batch([GTS0, GTS1["uneven"]])
    a = crit.assigner.assign(priors, batch, K)
    ignored = a.labels == -1  # RetinaNet also ignores IoU in [0.4, 0.5) without any region
    by_region = ignored & (crit.assigner.assign(priors, plain_batch, K).labels != -1)
    assert by_region[1].sum() >= 20 and not by_region[0].any()
    # points (FCOS) strictly inside / anchors entirely inside the region and not positive are ignored
    region = torch.tensor(IGNORE[1][0], dtype=torch.float32)
    if priors.anchors is None:
        inside = ((priors.points > region[:2]) & (priors.points < region[2:])).all(-1)
    else:
        inside = ((priors.anchors[:, :2] >= region[:2]) & (priors.anchors[:, 2:] <= region[2:])).all(-1)
    assert torch.equal(ignored[1][inside], ~a.pos_mask[1][inside])

    out = random_outputs(head, crit, priors, seed=4, requires_grad=True)
    losses = family_loss(crit, out, priors, batch)
    want, _ = reference(head, crit, out, priors, batch)
    assert_losses_close(losses, want)
    sum(losses.values()).backward()
    for name, t in out.items():
        assert torch.all(t.grad[ignored] == 0), name
    assert torch.all(out["cls"].grad[1][~ignored[1]] != 0)

    # confident foreground logits on ignored priors change nothing; without the region they would
    with torch.no_grad():
        changed = {k: v.detach().clone() for k, v in out.items()}
        changed["cls"][ignored] = 8.0
    again = family_loss(crit, changed, priors, batch)
    for name in losses:
        torch.testing.assert_close(again[name], losses[name].detach(), msg=name)
    no_region = family_loss(crit, changed, priors, plain_batch)
    assert float(no_region["loss_cls"]) > 2 * float(again["loss_cls"])


@pytest.mark.parametrize("head", list(FAMILIES))
def test_weights_and_names_per_head(head):
    crit = make_criterion(head)
    assert set(crit.loss.weights) == EXPECTED_NAMES[head]
    want = {"retinanet": (1.0, 1.0), "atss": (1.0, 2.0), "gfl": (1.0, 2.0), "fcos": (1.0, 1.0), "yolo": (0.5, 7.5)}[head]
    assert (crit.loss.weights["loss_cls"], crit.loss.weights["loss_bbox"]) == want
    if "loss_dfl" in EXPECTED_NAMES[head]:
        assert crit.loss.weights["loss_dfl"] == {"gfl": 0.25, "yolo": 1.5}[head]
    if head == "retinanet":
        assert make_criterion(head, "giou").loss.weights["loss_bbox"] == 2.0


def test_gfl_dfl_target_is_clamped_below_the_last_bin():
    """A GT side farther than reg_max strides from its anchor centre gets target reg_max - 0.1,
    so DFL there is ``-(0.1 log S_15 + 0.9 log S_16)``; numbers by hand."""
    crit = make_criterion("gfl")
    priors = crit.prior_generator([(8, 8)], torch.device("cpu"))  # P3 only, anchor centres at multiples of 8
    batch = make_batch([([[4, 24, 200, 40]], [0])], size=64)  # right side far beyond 16 strides
    a = crit.assigner.assign(priors, batch, K)
    pts = priors.points[a.pos_mask[0]]
    assert pts.tolist() == [[48.0, 32.0], [56.0, 32.0]]  # sides (strides): l 5.5|6.5, t 1, r 19|18, b 1
    n = crit.decoder.reg_max + 1
    reg = torch.zeros(1, 64, 4, n)
    reg[..., 16] = 20.0  # every side: almost all the mass on bin 16
    out = {"cls": torch.full((1, 64, K), -4.0), "reg": reg.reshape(1, 64, -1)}
    losses = family_loss(crit, out, priors, batch)
    lse = math.log(math.exp(20.0) + 16)  # log S_i = -lse (i < 16), 20 - lse (i = 16)
    # left (5.5 / 6.5), top (1), bottom (1): both bins below 16 -> lse each; right (15.9): lse - 18
    per_prior = 3 * lse + (lse - 0.9 * 20)
    w = 1 / (1 + math.exp(4.0))  # max sigmoid class score; sum of weights 2w < 1 -> factor 1
    want_dfl = 0.25 * (2 * w * per_prior) / 4.0 / 1.0
    torch.testing.assert_close(losses["loss_dfl"], torch.tensor(want_dfl), rtol=1e-5, atol=0)
    ref, _ = reference("gfl", crit, out, priors, batch)
    assert_losses_close(losses, ref)


def test_centerness_weighted_box_loss_below_one_fcos_no_clamp_atss_clamps_to_one():
    """mmdet: FCOS divides by max(sum of centerness targets, 1e-6), ATSS by max(sum, 1)."""
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    # FCOS: a small GT whose only positive is the point (4, 4), centerness sqrt(3/8 * 1/5) = 0.274
    crit = make_criterion("fcos")
    priors = crit.prior_generator(sizes, torch.device("cpu"))
    batch = make_batch([([[1, 3, 12, 9]], [0])], size=64)
    a = crit.assigner.assign(priors, batch, K)
    assert priors.points[a.pos_mask[0]].tolist() == [[4.0, 4.0]]
    N = priors.points.shape[0]
    reg = torch.ones(1, N, 4)
    reg[0, 0] = torch.tensor([2.0, 1.0, 8.0, 5.0])  # predicted (2, 3, 12, 9): IoU 60 / 66
    out = {"cls": torch.zeros(1, N, K), "reg": reg, "centerness": torch.zeros(1, N, 1)}
    losses = family_loss(crit, out, priors, batch)
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(-math.log(10 / 11)))
    ctr = math.sqrt(3 / 8 * 1 / 5)
    bce = -(ctr * math.log(0.5) + (1 - ctr) * math.log(0.5))
    torch.testing.assert_close(losses["loss_centerness"], torch.tensor(bce))

    # ATSS: two positives (anchor centres (16, 16), (24, 16)) whose centerness sums to 0.94 < 1
    crit = make_criterion("atss")
    priors = crit.prior_generator(sizes, torch.device("cpu"))
    batch = make_batch([([[10, 12, 26, 22]], [0])], size=64)
    a = crit.assigner.assign(priors, batch, K)
    assert priors.points[a.pos_mask[0]].tolist() == [[16.0, 16.0], [24.0, 16.0]]
    N = priors.points.shape[0]
    out = {"cls": torch.zeros(1, N, K), "reg": torch.zeros(1, N, 4), "centerness": torch.zeros(1, N, 1)}
    losses = family_loss(crit, out, priors, batch)
    ctr_sum = math.sqrt(6 / 10 * 4 / 6) + math.sqrt(2 / 14 * 4 / 6)
    giou = 1 - 160 / 4096  # the GT lies inside both 64-px anchors: GIoU = IoU
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(2.0 * ctr_sum * giou / 1.0))


# ------------------------------------------------------------------ Detector: flatten and loss
def tiny(head):
    cfg = detector_config(head=head, backbone="test_resnet", fpn_channels=32, feat_channels=32, stacked_convs=2)
    torch.manual_seed(0)
    return build_detector(cfg, num_classes=K)


@pytest.fixture(scope="module", params=list(FAMILIES))
def detector(request):
    return tiny(request.param)


def test_detector_loss_equals_family_loss_on_flat_outputs(detector):
    model = detector
    batch = make_batch([([[5, 6, 30, 25], [35, 32, 60, 63]], [0, 2]), ([[10, 10, 45, 35]], [1])], size=64)
    # random pixels, so that every output cell differs and a wrong row order cannot go unseen
    batch.images = torch.randn(batch.images.shape, generator=torch.Generator().manual_seed(0))
    outputs = model(batch.images)
    sizes = [tuple(x.shape[-2:]) for x in outputs["cls"]]
    # a 64-px image: P3-P7 for the FPN families, P3-P5 for yolo's PAN (the family's neck_levels)
    levels = FAMILIES[model.family.name].neck_levels
    assert model.head.num_levels == levels
    assert sizes == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)][:levels]
    assert all(len(v) == levels for v in outputs.values())
    A = model.head.num_anchors
    # flatten by hand: [B, A*C, H, W] -> [B, H, W, A, C] -> rows (level, y, x, anchor)
    flat = {}
    for name, levels in outputs.items():
        rows = []
        for x in levels:
            B, AC, H, W = x.shape
            rows.append(x.reshape(B, A, AC // A, H, W).permute(0, 3, 4, 1, 2).reshape(B, H * W * A, AC // A))
        flat[name] = torch.cat(rows, 1)
    got_flat = model.flat_outputs(outputs)
    assert set(got_flat) == set(flat)
    for name in flat:
        torch.testing.assert_close(got_flat[name], flat[name], rtol=0, atol=0)
    priors = model.prior_generator(sizes, torch.device("cpu"))
    assert flat["cls"].shape[1] == priors.points.shape[0]
    losses = model.loss(outputs, batch)
    # the assignment of these predictions: prediction-aware assigners (yolo's task-aligned one)
    # read them, the others ignore them
    assignment = model.assign(priors, batch, flat)
    want = model.detection_loss(flat, priors, assignment)
    assert set(losses) == EXPECTED_NAMES[model.family.name]
    for name in want:
        torch.testing.assert_close(losses[name], want[name], rtol=0, atol=0)
    assert int(assignment.num_pos) >= 3


# per family, by hand from its definition: priors per location, regression channels per prior
# (4 deltas / distances, or 4 x 17 distribution bins with reg_max 16), point offset in strides
FLAT_ROW = {
    "retinanet": (9, 4, 0.0),
    "atss": (1, 4, 0.0),
    "gfl": (1, 68, 0.0),
    "fcos": (1, 4, 0.5),
    "yolo": (1, 68, 0.5),
}


@pytest.mark.parametrize("head, anchor", [("retinanet", 7)] + [(h, 0) for h in FAMILIES])
def test_flat_row_of_an_output_cell_is_the_prior_at_that_cell(head, anchor):
    """A spike in level 2 at (y, x, anchor a, class c) lands in the row of the prior whose
    point is that cell's centre (anchors: (x*s, y*s); FCOS / yolo points: ((x+.5)*s, (y+.5)*s))
    and whose anchor is the a-th anchor of the location (ratios outer, scales inner). The levels
    are the family's neck's (P3-P7, or P3-P5 for yolo): level 2 is P5 in both."""
    model = tiny(head)
    level, y, x, c = 2, 1, 3, 2
    stride = FPN_STRIDES[level]
    A, reg_ch, off = FLAT_ROW[head]
    assert model.head.num_anchors == A
    # the regression width the family's decoder reads
    want_reg = 4 * (model.decoder.reg_max + 1) if isinstance(model.decoder, DistributionDecoder) else 4
    assert reg_ch == want_reg
    assert model.head.num_levels == FAMILIES[head].neck_levels > level
    sizes = [(8, 12), (4, 6), (2, 4), (1, 2), (1, 1)][:model.head.num_levels]
    outputs = {"cls": [torch.zeros(1, A * K, h, w) for h, w in sizes],
               "reg": [torch.zeros(1, A * reg_ch, h, w) for h, w in sizes]}
    outputs["cls"][level][0, anchor * K + c, y, x] = 5.0
    outputs["reg"][level][0, anchor * outputs["reg"][level].shape[1] // A, y, x] = 7.0
    flat = model.flat_outputs(outputs)
    assert flat["reg"].shape[-1] == reg_ch
    row = int(flat["cls"][0, :, c].argmax())
    assert flat["cls"].flatten().abs().nonzero().numel() == 1
    assert float(flat["reg"][0, row, 0]) == 7.0 and flat["reg"].flatten().abs().nonzero().numel() == 1
    pri = model.priors(outputs)
    assert pri.points.shape[0] == sum(h * w * A for h, w in sizes)
    expect_start = sum(h * w * A for h, w in sizes[:level])
    assert row == expect_start + (y * sizes[level][1] + x) * A + anchor
    assert int(pri.level[row]) == level and float(pri.stride[row]) == stride
    torch.testing.assert_close(pri.points[row], torch.tensor([(x + off) * stride, (y + off) * stride]))
    if head == "retinanet":
        ratio, scale = (0.5, 1.0, 2.0)[anchor // 3], 4 * 2 ** ((anchor % 3) / 3)
        w, h = stride * scale / math.sqrt(ratio), stride * scale * math.sqrt(ratio)
        cx, cy = x * stride, y * stride
        torch.testing.assert_close(pri.anchors[row], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    elif head in ("atss", "gfl"):  # one square anchor, octave base 8: 8 strides wide, centred at (x*s, y*s)
        cx, cy, half = x * stride, y * stride, 4.0 * stride
        torch.testing.assert_close(pri.anchors[row], torch.tensor([cx - half, cy - half, cx + half, cy + half]))
    else:  # anchor-free points (FCOS, yolo)
        assert pri.anchors is None
