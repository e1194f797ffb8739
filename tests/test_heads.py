"""Dense heads: output shapes, mmdet conventions, and the CrossKD tower API composition."""
import math

import pytest
import torch
from torch import nn

from kdctl.errors import KdctlError
from kdctl.models.families import FAMILIES
from kdctl.models.families.atss import ATSSHead
from kdctl.models.families.fcos import FCOSHead
from kdctl.models.families.gfl import GFLHead
from kdctl.models.families.retinanet import RetinaHead

K, C, W = 3, 16, 32  # classes, FPN channels, tower width (GroupNorm(8) in tests)
SIZES = [(12, 10), (6, 5), (3, 3), (2, 2), (1, 1)]  # P3-P7; a family's neck gives the first neck_levels


def make(head: str, **kwargs):
    """``head``'s family head, built for the levels of the family's neck (``Family.neck_levels``)."""
    kwargs.setdefault("norm", "gn")
    kwargs.setdefault("num_levels", FAMILIES[head].neck_levels)
    return FAMILIES[head].head(K, C, W, stacked_convs=4, num_groups=8, **kwargs)


def feats(batch=2, levels=len(SIZES)):
    torch.manual_seed(0)
    return [torch.randn(batch, C, h, w) for h, w in SIZES[:levels]]


def randomise(head: nn.Module) -> None:
    """Larger weights and non-unit scales/norm affines, so every block matters numerically."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 0 else 0.0))


# per family, by hand from its definition: output names, regression channels per prior (4 deltas /
# distances, or 4 x 17 distribution bins with reg_max 16), priors per location, neck levels
# (P3-P7, or P3-P5 for yolo's PAN), one tower per level (yolo's decoupled head) or shared
OUTPUTS = {
    "retinanet": (("cls", "reg"), 4, 9, 5, False),
    "fcos": (("cls", "reg", "centerness"), 4, 1, 5, False),
    "atss": (("cls", "reg", "centerness"), 4, 1, 5, False),
    "gfl": (("cls", "reg"), 68, 1, 5, False),
    "yolo": (("cls", "reg"), 68, 1, 3, True),
}


@pytest.mark.parametrize("head", list(FAMILIES))
def test_output_shapes(head):
    names, reg_ch, anchors, levels, per_level = OUTPUTS[head]
    model = make(head)
    assert model.num_levels == FAMILIES[head].neck_levels == levels and model.per_level == per_level
    out = model(feats(levels=levels))
    assert tuple(out) == names
    assert model.num_anchors == anchors and model.num_classes == K and model.in_channels == C
    assert model.feat_channels == W and model.num_blocks == 4
    assert all(len(out[name]) == levels for name in names)
    for level, (h, w) in enumerate(SIZES[:levels]):
        assert out["cls"][level].shape == (2, anchors * K, h, w)
        assert out["reg"][level].shape == (2, anchors * reg_ch, h, w)
        if "centerness" in out:
            assert out["centerness"][level].shape == (2, anchors, h, w)


@pytest.mark.parametrize("head", list(FAMILIES))
@pytest.mark.parametrize("norm", ["gn", "bn", "none"])
def test_forward_from_forward_tower_composes_to_forward(head, norm):
    model = make(head, norm=norm)
    randomise(model)
    xs = feats(levels=model.num_levels)  # one feature per level the head was built for
    assert len(xs) == FAMILIES[head].neck_levels
    with torch.no_grad():
        full = model(xs)
        for branch in ("cls", "reg"):
            for i in range(model.num_blocks + 1):
                for level, x in enumerate(xs):
                    # per-level towers need the level; shared ones are called as before, without it
                    mid = model.forward_tower(x, branch, i, level if model.per_level else None)
                    assert mid.shape[1] == (C if i == 0 else W)
                    got = model.forward_from(mid, branch, i, level)
                    assert tuple(got) == model.branch_outputs[branch]
                    for name, value in got.items():
                        torch.testing.assert_close(value, full[name][level], rtol=0, atol=1e-6)


def test_forward_tower_returns_pre_activation_and_does_not_mutate():
    model = make("atss")
    randomise(model)
    x = feats()[0]
    assert model.forward_tower(x, "cls", 0) is x
    mid = model.forward_tower(x, "reg", 2)
    assert (mid < 0).any()  # conv+norm output, before ReLU
    kept = mid.clone()
    model.forward_from(mid, "reg", 2, 0)
    assert torch.equal(mid, kept)
    # block i is conv -> norm, with ReLU only between blocks
    block0 = model.reg_tower[0]
    assert torch.allclose(model.forward_tower(x, "reg", 1), block0[1](block0[0](x)))
    assert torch.allclose(mid, model.reg_tower[1](torch.relu(block0(x))))


def test_where_centerness_and_scales_attach():
    assert make("atss").branch_outputs == {"cls": ("cls",), "reg": ("reg", "centerness")}
    assert make("fcos").branch_outputs == {"cls": ("cls", "centerness"), "reg": ("reg",)}  # mmdet default
    assert make("fcos", centerness_on_reg=True).branch_outputs["reg"] == ("reg", "centerness")
    assert make("gfl").branch_outputs == {"cls": ("cls",), "reg": ("reg",)}
    assert make("retinanet").scales is None
    for head in ("fcos", "atss", "gfl"):
        assert len(make(head).scales) == 5


def test_scale_multiplies_regression_per_level():
    model = make("atss")
    x = feats()[1]
    base = model.forward_from(x, "reg", 0, 1)["reg"]
    with torch.no_grad():
        model.scales[1].scale.fill_(2.5)
    torch.testing.assert_close(model.forward_from(x, "reg", 0, 1)["reg"], 2.5 * base)
    torch.testing.assert_close(model.forward_from(x, "reg", 0, 0)["reg"], base)


def test_fcos_regression_activation():
    x = feats()
    model = make("fcos")
    randomise(model)
    raw = model.scales[0](model.reg_pred(torch.relu(model.forward_tower(x[0], "reg", 4))))
    torch.testing.assert_close(model(x)["reg"][0], raw.exp())
    model.norm_on_bbox = True
    torch.testing.assert_close(model(x)["reg"][0], raw.clamp(min=0))
    assert model.training and model.eval()(x)["reg"][0].equal(model.train()(x)["reg"][0])  # no stride in eval


def test_mmdet_init():
    model = make("gfl")
    prior = -math.log(0.99 / 0.01)
    assert torch.allclose(model.cls_pred.bias, torch.full((K,), prior))
    assert torch.sigmoid(model.cls_pred.bias).allclose(torch.full((K,), 0.01))
    assert not model.reg_pred.bias.any()
    assert 0.007 < model.reg_tower[1][0].weight.std() < 0.013
    assert model.reg_tower[0][0].bias is None  # conv bias only without a norm (ConvModule 'auto')
    retina = make("retinanet", norm="none")
    assert retina.cls_tower[0][0].bias is not None and len(retina.cls_tower[0]) == 1
    assert RetinaHead(K, C, W, num_groups=8).cls_tower[0][0].bias is not None  # mmdet: no norm
    assert isinstance(FCOSHead(K, C, W, num_groups=8).cls_tower[0][1], nn.GroupNorm)
    assert GFLHead(K, C, W, num_groups=8).reg_max == 16
    assert isinstance(ATSSHead(K, C, W, norm="bn").reg_tower[0][1], nn.BatchNorm2d)


def test_bad_arguments():
    with pytest.raises(KdctlError, match="feat_channels=48 is not divisible by GroupNorm's 32 groups"):
        GFLHead(K, C, 48)
    model = make("gfl")
    with pytest.raises(ValueError, match="upto"):
        model.forward_tower(feats()[0], "cls", 5)
    with pytest.raises(ValueError, match="branch"):
        model.forward_tower(feats()[0], "box", 1)
    with pytest.raises(ValueError, match="level"):
        model.forward_from(feats()[0], "reg", 0, 5)
