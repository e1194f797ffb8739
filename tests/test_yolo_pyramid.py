"""kdctl's own real-time parts: the CSP-ELAN darknet registered with timm, the pyramid PAN (one
width per level) and what reads neck widths downstream (the per-level head, feature-KD and
CrossKD adapters), the yolo head's init and BatchNorm settings."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from kdctl.distill.crosskd import CrossKD
from kdctl.distill.methods import build_distiller
from kdctl.models.backbone import Backbone
from kdctl.models.blocks import CSPELAN
from kdctl.models.cspelan import SPP, CSPElanNet
from kdctl.models.detector import build_detector
from kdctl.models.necks.pan import PAN, level_widths
from kdctl.recipe import DetectorConfig, detector_config, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def pyramid_cfg(width=16, backbone="cspelan_n", **yolo) -> DetectorConfig:
    return detector_config(head="yolo", backbone=backbone, fpn_channels=width, feat_channels=width, stacked_convs=2,
                          norm_eval=False, frozen_stages=-1,
                          yolo={"neck_widths": "pyramid", "neck_block": "elan", **yolo})


# ============================================================================= backbone
@pytest.mark.parametrize("size,channels", [("n", [64, 128, 256]), ("s", [128, 256, 512]), ("m", [192, 384, 768])])
def test_cspelan_sizes_are_timm_backbones_with_the_width_multiples(size, channels):
    assert timm.is_model(f"cspelan_{size}")
    b = Backbone(f"cspelan_{size}", norm_eval=False, frozen_stages=-1)
    assert b.channels == channels and b.strides == [8, 16, 32]
    assert b.mean == (0.0, 0.0, 0.0) and b.std == (1.0, 1.0, 1.0)  # inputs in [0, 1], as real-time detectors
    feats = b(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(channels[0], 8, 8), (channels[1], 4, 4), (channels[2], 2, 2)]


def test_cspelan_depth_multiple_sets_the_blocks_per_stage():
    # base 3/6/6/3 blocks: n and s (0.33) round to 1/2/2/1, m (0.67) to 2/4/4/2
    for size, blocks in (("n", [1, 2, 2, 1]), ("m", [2, 4, 4, 2])):
        net = timm.create_model(f"cspelan_{size}")
        assert [len(stage[1].blocks) for stage in net.stages] == blocks, size
        assert isinstance(net.stages[3][2], SPP)


def test_cspelan_stages_freeze_and_batchnorm_is_the_real_time_setting():
    b = Backbone("cspelan_n", norm_eval=False, frozen_stages=1)
    frozen = {n.split(".")[0] for n, p in b.body.named_parameters() if not p.requires_grad}
    assert frozen == {"stem_0", "stem_1", "stages_0"}  # the stem (conv, BN) and the stride-4 stage
    bn = next(m for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.03, 1e-3)


def test_cspelan_block_aggregates_both_halves_and_every_block_output():
    block = CSPELAN(16, 24, depth=3)
    assert block.hidden == 12 and block.transition[0].in_channels == (2 + 3) * 12
    x = torch.randn(2, 16, 8, 8)
    a, b = block.split(x).chunk(2, dim=1)
    outs = [a, b]
    for blk in block.blocks:
        outs.append(blk(outs[-1]))
    torch.testing.assert_close(block(x), block.transition(torch.cat(outs, dim=1)))


def test_spp_pools_are_the_5_9_13_windows():
    spp = SPP(8, 8).eval()
    x = torch.randn(1, 8, 13, 13)
    r = spp.reduce(x)
    windows = [F.max_pool2d(r, k, stride=1, padding=k // 2) for k in (5, 9, 13)]
    torch.testing.assert_close(spp(x), spp.fuse(torch.cat([r, *windows], dim=1)))


def test_cspelan_classifier_is_dropped_by_features_only():
    net = CSPElanNet(width=0.25, depth=0.33, num_classes=10)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert not any("head" in n for n, _ in Backbone("cspelan_n").body.named_parameters())


# ============================================================================= neck and head
def test_pyramid_pan_doubles_the_width_per_level_and_uniform_is_unchanged():
    pan = PAN([64, 128, 256], [16, 32, 64], depth=1, block="elan")
    outs = pan([torch.randn(1, 64, 8, 8), torch.randn(1, 128, 4, 4), torch.randn(1, 256, 2, 2)])
    assert [o.shape[1] for o in outs] == [16, 32, 64] and pan.out_channels == [16, 32, 64]
    assert pan.top_down4.split[0].in_channels == 64 + 128 and pan.bottom_up5.split[0].in_channels == 32 + 64
    uniform = PAN([64, 128, 256], 16)
    assert uniform.out_channels == 16 and level_widths(uniform.out_channels, 3) == [16, 16, 16]
    with pytest.raises(ValueError, match="csp' or 'elan"):
        PAN([8, 8, 8], 8, block="dense")


def test_recipe_pyramid_reaches_neck_and_per_level_head_towers():
    model = build_detector(pyramid_cfg(16), 3)
    assert model.neck.out_channels == [16, 32, 64] and model.head.in_channels == [16, 32, 64]
    assert [model.head.tower("cls", lvl)[0][0].in_channels for lvl in range(3)] == [16, 32, 64]
    assert model.head.feat_channels == 16  # one tower width: what CrossKD past reuse_idx 0 crosses
    images = torch.randn(2, 3, 64, 64)
    out = model.eval()(images)
    assert [t.shape[1] for t in out["cls"]] == [3, 3, 3]
    feats = model.features(images)
    for upto in range(3):  # the tower API still composes to the plain forward on every level
        composed, _ = model.head.forward_with_tower(feats, upto)
        for a, b in zip(out["reg"], composed["reg"]):
            torch.testing.assert_close(a, b)


def test_head_init_default_is_pytorchs_and_batchnorm_fields_reach_neck_and_head():
    torch.manual_seed(0)
    former = build_detector(pyramid_cfg(16, head_init="normal", bn_momentum=None, bn_eps=None), 3)
    normal = former.head
    default = build_detector(pyramid_cfg(16), 3)  # the defaults: PyTorch init, BatchNorm 0.03 / 1e-3
    w_normal, w_default = normal.tower("cls", 0)[0][0].weight, default.head.tower("cls", 0)[0][0].weight
    assert w_normal.std().item() == pytest.approx(0.01, rel=0.2)
    bound = 1 / (16 * 9) ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 16*3*3: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert w_default.abs().max().item() <= bound and w_default.std().item() > 0.5 * bound / 3 ** 0.5
    # the stride-aware prior bias survives the re-initialisation
    torch.testing.assert_close(default.head.cls_pred[0].bias, normal.cls_pred[0].bias)
    for part, want in ((default.neck, (0.03, 1e-3)), (default.head, (0.03, 1e-3)), (former.head, (0.1, 1e-5))):
        bns = [m for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and all((m.momentum, m.eps) == want for m in bns)


# ============================================================================= distillation adapters
def test_feature_kd_adapts_each_level_to_the_teachers_width_at_that_stride():
    torch.manual_seed(0)
    student = build_detector(pyramid_cfg(16), 3)
    teacher = build_detector(detector_config(head="gfl", backbone="test_resnet", fpn_channels=32, feat_channels=32,
                                            stacked_convs=2), 3)
    r = load_recipe("shapes", ["distill.losses=[{type: feat_l2}]"])
    d = build_distiller(student, teacher, r.distill.losses).train()
    method = d.methods["feat_l2"]
    assert [tuple(method.adapters[str(i)].weight.shape[:2]) for i in range(3)] == [(32, 16), (32, 32), (32, 64)]
    images = torch.randn(2, 3, 64, 64)
    s_feats = student.features(images)
    with torch.no_grad():
        t_feats = teacher.features(images)
    got = method.feature_loss(s_feats, t_feats, [(0, 0), (1, 1), (2, 2)])["loss_feat_l2"]
    expect = sum(F.mse_loss(method.adapters[str(i)](s_feats[i]), t_feats[i]) for i in range(3))
    torch.testing.assert_close(got, expect)


def test_crosskd_at_reuse_idx_0_has_an_adapter_per_branch_and_level_for_pyramid_necks():
    torch.manual_seed(0)
    student, teacher = build_detector(pyramid_cfg(16), 3), build_detector(pyramid_cfg(24), 3)
    ck = CrossKD(student.head, teacher.head, student.family.kd, student.decoder, reuse_idx=0)
    assert ck.per_level and tuple(ck.adapters["reg_2"].weight.shape[:2]) == (96, 64)
    images = torch.randn(2, 3, 64, 64)
    _, s_mid = student.head.forward_with_tower(student.features(images), 0)
    _, t_mid = teacher.head.forward_with_tower(teacher.features(images), 0)
    cross = ck.cross_predictions(s_mid, t_mid, teacher.head)
    assert [t.shape[1] for t in cross["cls"]] == [3, 3, 3]
    # past reuse_idx 0 the tower widths are one number: one adapter per branch, as before
    ck2 = CrossKD(student.head, teacher.head, student.family.kd, student.decoder, reuse_idx=1)
    assert not ck2.per_level and set(ck2.adapters) == {"cls", "reg"}
