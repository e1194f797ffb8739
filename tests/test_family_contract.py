"""The meta-architecture contract (kdctl.models.contract) for every entry of FAMILIES: the
capabilities, the KD surfaces (taps, detection_losses), the export tensor path, postprocess and
the end-to-end candidates, class-row surgery, distillation and the pair check over capabilities,
and the ONNX tensor path in onnxruntime. A new family is tested by adding it to the table."""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from kdctl.distill.methods import build_distiller
from kdctl.export.onnx import OrtRunner, export_onnx
from kdctl.export.source import TensorPath
from kdctl.models import contract
from kdctl.models.detector import build_detector
from kdctl.models.families import FAMILIES
from kdctl.models.postprocess import candidates
from kdctl.recipe import CrossKDLoss, DetectorConfig, FeatureLoss, MimicLoss, SSIMLoss, detector_config
from kdctl.recipe.pairs import pair_problem

NAMES = list(FAMILIES)
H, W = 64, 96  # not square: a swapped (W, H) shows
STACKED = 2
# the end-to-end module runs one image: wider than 128 px, so that P7 of a 32-wide GroupNorm(32) tower has more
# than one value per group (torch refuses one, in eval mode too)
E2E = (64, 160)

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_of(name: str) -> DetectorConfig:
    return detector_config(head=name, backbone="test_resnet", fpn_channels=32, feat_channels=32, stacked_convs=STACKED)


def detector(name: str, seed: int = 0, num_classes: int = 3):
    torch.manual_seed(seed)
    return build_detector(cfg_of(name), num_classes=num_classes)


def images(n: int = 2, seed: int = 1, h: int = H, w: int = W) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def gt_batch(imgs: torch.Tensor, labels=(0, 2)) -> SimpleNamespace:
    """One GT per image (resized-image pixels), as tests/test_families.py builds it."""
    n = imgs.shape[0]
    return SimpleNamespace(images=imgs, boxes=torch.tensor([[[4.0, 6.0, 40.0, 30.0]], [[10.0, 10.0, 90.0, 60.0]]])[:n],
                           labels=torch.tensor([[labels[0]], [labels[1]]])[:n], gt_mask=torch.ones(n, 1, dtype=torch.bool),
                           ignore=torch.zeros(n, 0, 4), ignore_mask=torch.zeros(n, 0, dtype=torch.bool),
                           pad_sizes=torch.tensor([[H, W]] * n))


def assert_raw_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert len(a[key]) == len(b[key]), key
        for level, (x, y) in enumerate(zip(a[key], b[key])):
            assert torch.equal(x, y), (key, level)


DET_FIELDS = ("batch_index", "boxes", "scores", "labels")


def rows_of(d) -> list:
    """The detections as sorted (image, score, box, label) rows."""
    return sorted(zip(d.batch_index.tolist(), d.scores.tolist(), d.boxes.tolist(), d.labels.tolist()))


def assert_dets_equal(a, b) -> None:
    for field in DET_FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field)), field


# ============================================================================= capabilities
@pytest.mark.parametrize("name", NAMES)
def test_a_detector_offers_its_familys_capabilities_which_the_contract_names(name):
    model = detector(name)
    assert model.capabilities == FAMILIES[name].capabilities
    assert model.capabilities and model.capabilities <= set(contract.CAPABILITIES)


# ============================================================================= distillation surfaces
@pytest.mark.parametrize("name", NAMES)
def test_taps_give_the_plain_forwards_neck_and_raw_outputs_at_every_tower_index(name):
    model = detector(name).eval()
    x = images()
    with torch.no_grad():
        feats, plain = model.features(x), model(x)
        taps = model.taps(x)
        assert len(taps.neck) == len(feats) and all(torch.equal(a, b) for a, b in zip(taps.neck, feats))
        assert_raw_equal(taps.raw, plain)
        assert taps.tower is None
        for idx in range(STACKED + 1):
            t = model.taps(x, tower_idx=idx)
            assert_raw_equal(t.raw, plain)
            assert set(t.tower) == {"cls", "reg"}
            for branch, levels in t.tower.items():
                assert len(levels) == len(feats), (branch, idx)
                for level, (got, feat) in enumerate(zip(levels, feats)):
                    # the pre-activation output of block idx-1 (idx 0: the neck level itself)
                    expect = feat if idx == 0 else model.head.forward_tower(feat, branch, idx, level)
                    assert torch.equal(got, expect), (branch, idx, level)
        neck_only = model.taps(x, head=False)
        assert neck_only.raw is None and neck_only.tower is None
        assert all(torch.equal(a, b) for a, b in zip(neck_only.neck, feats))


@pytest.mark.parametrize("name", NAMES)
def test_detection_losses_of_the_taps_are_the_loss_of_the_forward_with_what_it_computed(name):
    model = detector(name).train()
    x = images()
    b = gt_batch(x)
    torch.manual_seed(5)
    expect = model.loss(model(x), b)
    torch.manual_seed(5)
    taps = model.taps(x)
    losses, shared = model.detection_losses(taps, b)
    assert set(losses) == set(expect) == set(FAMILIES[name].loss_weights)
    for key, value in expect.items():
        assert torch.equal(losses[key], value), key
    assert isinstance(shared, contract.DenseShared)
    flat = model.flat_outputs(taps.raw)
    assert set(shared.flat) == set(flat) and all(torch.equal(shared.flat[k], flat[k]) for k in flat)
    priors = model.priors(taps.raw)
    assert torch.equal(shared.priors.points, priors.points) and shared.priors.num_level_priors == priors.num_level_priors
    assigned = model.assign(priors, b, flat)
    assert torch.equal(shared.assignment.labels, assigned.labels) and int(shared.assignment.num_pos) > 0


# ============================================================================= export tensor path
@pytest.mark.parametrize("name", NAMES)
def test_the_raw_tuple_round_trips_with_one_unique_name_per_tensor(name):
    model = detector(name).eval()
    with torch.no_grad():
        raw = model(images())
    flat = model.raw_tuple(raw)
    assert_raw_equal(model.raw_from_tuple(flat), raw)
    assert_raw_equal(model.raw_from_tuple([t.numpy() for t in flat]), raw)  # arrays too (onnxruntime's)
    names = model.raw_names()
    assert len(names) == len(flat) == len(raw) * len(model.strides) and len(set(names)) == len(names)
    assert names[0] == "cls_p3" and names[len(model.strides)] == "reg_p3"  # branch-major, finest first
    # each name is its tensor's: branch cls_p<l> has A*K channels at stride 2**l
    for n, t in zip(names, flat):
        branch, level = n.rsplit("_p", 1)
        assert t.shape[-2:] == (-(-H // 2 ** int(level)), -(-W // 2 ** int(level))), n
        if branch == "cls":
            assert t.shape[1] == model.head.num_anchors * model.num_classes, n


# ============================================================================= postprocess
@pytest.mark.parametrize("name", NAMES)
def test_postprocess_keep_classes_keeps_that_class_only_and_all_true_changes_nothing(name):
    model = detector(name).eval()
    with torch.no_grad():
        raw = model(images())
    sizes, scales = torch.tensor([[H, W], [H, W]]), torch.ones(2, 2)
    opts = dict(score_thr=0.0, nms_iou=model.decoder.nms_iou, topk_pre_nms=10**6, max_per_image=10**6)
    full = model.postprocess(raw, sizes, scales, **opts)
    assert set(full.labels.tolist()) == {0, 1, 2}
    assert_dets_equal(model.postprocess(raw, sizes, scales, keep_classes=torch.ones(3, dtype=torch.bool), **opts), full)
    for k in range(3):
        only = model.postprocess(raw, sizes, scales, keep_classes=torch.arange(3) == k, **opts)
        assert only.labels.numel() > 0 and (only.labels == k).all()
        # NMS is class-wise and nothing is cut: exactly the full run's rows of class k (tied scores in any order)
        rows = full.labels == k
        assert only.scores.tolist() == full.scores[rows].tolist()
        assert rows_of(only) == rows_of(type(full)(*(getattr(full, f)[rows] for f in DET_FIELDS)))


@pytest.mark.parametrize("name", NAMES)
def test_end_to_end_candidates_are_the_candidates_of_the_forward_on_its_canvas(name):
    model = detector(name).eval()
    h, w = E2E
    x = images(h=h, w=w)
    with torch.no_grad():
        raw = model(x)
    limit = torch.tensor([w, h, w, h], dtype=torch.float32)
    flat, priors = model.flat_outputs(raw), model.priors(raw)
    # the candidates' median score (above a threshold of 1 none is scaled by centerness): a threshold that keeps
    # some and drops some (yolo's initial scores are far below any fixed one)
    thr = float(candidates(model.decoder, flat, priors, limit, score_thr=1.0, topk_pre_nms=50)[1].median())
    module = model.end_to_end_candidates((h, w), score_thr=thr, topk_pre_nms=50)
    assert isinstance(module, torch.nn.Module)
    with torch.no_grad():
        got = module(x)
    expect = candidates(model.decoder, flat, priors, limit, score_thr=thr, topk_pre_nms=50)
    assert len(got) == 4
    for part, a, b in zip(("boxes", "scores", "labels", "keep"), got, expect):
        assert a.dtype == b.dtype and torch.equal(a, b), part
    boxes, keep = got[0], got[3]
    assert boxes[..., 2].max() <= w and boxes[..., 3].max() <= h and keep.any() and not keep.all()
    assert boxes.shape[1] == sum(min(50, n * 3) for n in priors.num_level_priors)


# ============================================================================= class-row surgery
@pytest.mark.parametrize("name", NAMES)
def test_keep_classes_cuts_the_classifier_rows_that_class_rows_names(name):
    model = detector(name).eval()
    state = model.state_dict()
    keys = model.classifier_keys()
    assert keys and set(keys) <= set(state) and all(k.startswith("head.cls_pred") for k in keys)
    A, K = model.head.num_anchors, model.num_classes
    for k in range(K):
        rows = model.class_rows([k], K)
        assert rows.dtype == torch.int64 and rows.tolist() == [a * K + k for a in range(A)]
    assert all(state[key].shape[0] == A * K for key in keys)
    small = copy.deepcopy(model)
    small.keep_classes([2, 0])
    assert small.num_classes == 2 and small.detection_loss.num_classes == 2
    rows = model.class_rows([2, 0])
    assert rows.tolist() == [a * K + k for a in range(A) for k in (2, 0)]  # anchor-major, in the order asked
    assert all(small.state_dict()[key].shape[0] == 2 * A and torch.equal(small.state_dict()[key], state[key][rows])
               for key in keys)
    x = images()
    with torch.no_grad():
        big, cut = model(x), small(x)
    for level, (a, b) in enumerate(zip(big["cls"], cut["cls"])):
        # the weights are copied exactly (above); a conv of fewer output channels may sum in another order
        torch.testing.assert_close(b, a[:, rows], rtol=1e-6, atol=1e-6, msg=f"level {level}")
    for key in big:  # the other outputs are untouched
        if key != "cls":
            assert all(torch.equal(a, b) for a, b in zip(big[key], cut[key])), key
    small.train()
    losses = small.loss(small(x), gt_batch(x, labels=(0, 1)))
    assert all(torch.isfinite(v) for v in losses.values())


# ============================================================================= distillation
KD_LOSSES = [CrossKDLoss(type="crosskd", reuse_idx=1), MimicLoss(type="pred_mimic"), SSIMLoss(type="ssim"),
             FeatureLoss(type="pkd"), FeatureLoss(type="feat_l2")]


@pytest.mark.parametrize("name", NAMES)
def test_every_kd_method_runs_over_the_contract_and_crosskd_skips_the_students_predictors(name):
    student, teacher = detector(name, seed=0), detector(name, seed=1)
    with torch.no_grad():
        for p in teacher.parameters():  # a teacher away from its (near-constant) initialisation
            p.add_(0.05 * torch.randn_like(p))
    d = build_distiller(student, teacher, KD_LOSSES)
    for method in d.methods.values():
        assert method.needs <= student.capabilities and method.needs <= teacher.capabilities, method.name
    d.train()
    x = images()
    losses = d(gt_batch(x))
    for key in ("loss_crosskd_cls", "loss_crosskd_reg", "loss_mimic_cls", "loss_mimic_reg", "loss_ssim", "loss_pkd",
                "loss_feat_l2", *FAMILIES[name].loss_weights):
        assert key in losses and torch.isfinite(losses[key]), key
    assert set(losses) - set(FAMILIES[name].loss_weights) <= {k for k in losses if k.startswith(
        ("loss_crosskd_", "loss_mimic_", "loss_ssim", "loss_pkd", "loss_feat_l2"))}
    kd = sum(v for k, v in losses.items() if k.startswith("loss_crosskd_"))
    assert kd > 0
    kd.backward()

    def grad(prefix):
        gs = [p.grad for n, p in student.named_parameters() if n.startswith(prefix)]
        assert gs, prefix
        return any(g is not None and g.abs().sum() > 0 for g in gs)

    assert grad("backbone.") and grad("neck.")
    assert not grad("head.cls_pred") and not grad("head.reg_pred")
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_the_pair_check_asks_capabilities_so_a_neck_only_family_gets_feature_losses_only(name, monkeypatch):
    monkeypatch.setitem(FAMILIES, name, dataclasses.replace(FAMILIES[name], capabilities=frozenset({contract.NECK})))
    cfg = cfg_of(name)
    msg = pair_problem(cfg, cfg, [CrossKDLoss(type="crosskd", reuse_idx=0)])
    lacking = sorted({contract.DENSE_TOWER, contract.DENSE_OUTPUTS} - {contract.NECK})[0]  # CrossKD needs both
    assert msg is not None and "\n" not in msg, msg
    assert f"capability {lacking!r}" in msg and f"family {name!r}" in msg and "student" in msg, msg
    assert pair_problem(cfg, cfg, [MimicLoss(type="pred_mimic")]) is not None
    assert pair_problem(cfg, cfg, [SSIMLoss(type="ssim")]) is None
    assert pair_problem(cfg, cfg, [FeatureLoss(type="pkd")]) is None
    # a detector built now has the family's capabilities, and the distiller refuses the same way
    student, teacher = detector(name), detector(name, seed=1)
    assert student.capabilities == frozenset({contract.NECK})
    with pytest.raises(ValueError, match="dense_outputs"):
        build_distiller(student, teacher, [CrossKDLoss(type="crosskd", reuse_idx=0)])
    build_distiller(student, teacher, [SSIMLoss(type="ssim")])


# ============================================================================= ONNX
@pytest.mark.parametrize("name", NAMES)
def test_the_onnx_tensor_path_matches_pytorch_in_onnxruntime_with_the_raw_names(name, tmp_path):
    model = detector(name).eval()
    path = tmp_path / f"{name}.onnx"
    # traced at batch 2 (dynamic batch): batch 1 is refused by torch at P7 (see E2E)
    export_onnx(TensorPath(model), path, (H, W), names=model.raw_names(), dynamic_batch=True)
    runner = OrtRunner(path, threads=1)
    assert runner.names == model.raw_names()
    x = images()
    with torch.no_grad():
        expect = model.raw_tuple(model(x))
    got = runner(x)
    assert len(got) == len(expect)
    for n, a, b in zip(model.raw_names(), got, expect):
        assert a.shape == b.shape, n
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=n)
