"""kdctl's own real-time backbone, a CSP-ELAN darknet, registered as timm models (``cspelan_n``,
``cspelan_s``, ``cspelan_m``) so that a recipe names it as any other backbone and
:class:`kdctl.models.backbone.Backbone` (``features_only``, ``frozen_stages``, weight files)
treats it as timm's own. Written from the papers; no YOLO implementation was read.

Papers:
  * Darknet layout (Redmon & Farhadi, "YOLOv3", 2018): a stem conv, then per stage a stride-2
    3x3 conv followed by residual blocks; five strides (2, 4, 8, 16, 32).
  * CSPNet (Wang et al., CVPRW 2020): each stage's blocks see only part of the channels; the other
    part skips them and both are concatenated before a 1x1 transition conv.
  * ELAN (Wang et al., "YOLOv7", CVPR 2023; "Designing Network Design Strategies Through Gradient
    Path Analysis", 2022): the transition aggregates the output of *every* stacked block, not only
    the last (shorter gradient paths, the same compute). :class:`CSPELAN` is both ideas in one
    block (:class:`kdctl.models.blocks.CSPELAN`).
  * SPP (He et al., "Spatial Pyramid Pooling in Deep Convolutional Networks", TPAMI 2015, as
    YOLOv3-SPP / YOLOv4 use it at stride 32): max pools of 5, 9 and 13 concatenated with the
    input. Three 5x5 pools in sequence give exactly the 5, 9 and 13 windows (stride 1), at a
    third of the cost; :class:`SPP` computes them so.

Sizes (width and depth multiples of a base, as the n / s / m sizes of real-time detectors): stem
64, stages 128 / 256 / 512 / 1024 channels with 3 / 6 / 6 / 3 blocks, times ``width`` (rounded up
to a multiple of 8) and ``depth`` (rounded, at least 1): n 0.25 / 0.33, s 0.5 / 0.33,
m 0.75 / 0.67. The block is a residual pair of 3x3 convs with a ``h -> h`` bottleneck of ratio 1
(ResNet's basic block, He et al. 2016). Every conv is conv (no bias) -> BatchNorm -> SiLU.

BatchNorm momentum 0.03 and eps 1e-3 (the values YOLOv4/YOLOv5-era real-time detectors train
with; PyTorch's are 0.1 and 1e-5) are this backbone's defaults (measured: BENCHMARKS.md,
"Peer parity"). Weights: PyTorch's default conv init, BatchNorm weight 1 and bias 0.
"""
from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from kdctl.models.blocks import CSPELAN, ConvBNAct, scaled_depth, scaled_width, set_batchnorm

__all__ = ["CSPElanNet", "SPP", "SIZES", "BN_MOMENTUM", "BN_EPS"]

BN_MOMENTUM, BN_EPS = 0.03, 1e-3
STEM, WIDTHS, DEPTHS = 64, (128, 256, 512, 1024), (3, 6, 6, 3)
SIZES = {"n": (0.25, 0.33), "s": (0.5, 0.33), "m": (0.75, 0.67)}  # (width, depth)


class SPP(nn.Module):
    """Spatial pyramid pooling at stride 1 (see the module docstring): 1x1 conv to ``cin // 2``,
    max pools of 5, 9, 13 (three 5x5 in sequence), concatenation of the four, 1x1 conv to ``cout``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        h = cin // 2
        self.reduce = ConvBNAct(cin, h)
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.fuse = ConvBNAct(4 * h, cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        p5 = self.pool(x)
        p9 = self.pool(p5)
        return self.fuse(torch.cat([x, p5, p9, self.pool(p9)], dim=1))


class CSPElanNet(nn.Module):
    """The CSP-ELAN darknet (see the module docstring) in timm's model conventions: ``stem``, then
    ``stages`` (an ``nn.Sequential`` of 4, the last ending in :class:`SPP`), ``feature_info`` for
    ``features_only``, and a classifier (global average pool + linear) that ``features_only``
    drops."""

    def __init__(self, width: float = 0.25, depth: float = 0.33, num_classes: int = 1000, in_chans: int = 3,
                 **_: object):
        super().__init__()
        stem = scaled_width(STEM, width)
        self.stem = ConvBNAct(in_chans, stem, 3, 2)
        stages, cin = [], stem
        self.feature_info = [dict(num_chs=stem, reduction=2, module="stem")]
        for i, (c, d) in enumerate(zip(WIDTHS, DEPTHS)):
            cout, n = scaled_width(c, width), scaled_depth(d, depth)
            layers = [ConvBNAct(cin, cout, 3, 2), CSPELAN(cout, cout, n, shortcut=True)]
            if i == len(WIDTHS) - 1:
                layers.append(SPP(cout, cout))
            stages.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=cout, reduction=4 * 2 ** i, module=f"stages.{i}"))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.num_classes = num_classes
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        set_batchnorm(self, BN_MOMENTUM, BN_EPS)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


# timm's register_model reads this module's default_cfgs: no published weights (url ""), inputs in
# [0, 1] without mean/std normalisation (the BatchNorm after the stem conv takes that role)
default_cfgs = generate_default_cfgs({
    f"cspelan_{size}": dict(url="", num_classes=1000, input_size=(3, 640, 640), mean=(0.0, 0.0, 0.0),
                            std=(1.0, 1.0, 1.0), first_conv="stem.0", classifier="head.2")
    for size in SIZES
})


def _create(size: str, pretrained: bool = False, **kwargs) -> CSPElanNet:
    width, depth = SIZES[size]
    return build_model_with_cfg(CSPElanNet, f"cspelan_{size}", pretrained,
                                feature_cfg=dict(flatten_sequential=True), width=width, depth=depth, **kwargs)


@register_model
def cspelan_n(pretrained: bool = False, **kwargs) -> CSPElanNet:
    """CSP-ELAN darknet, width 0.25, depth 0.33 (see :mod:`kdctl.models.cspelan`)."""
    return _create("n", pretrained, **kwargs)


@register_model
def cspelan_s(pretrained: bool = False, **kwargs) -> CSPElanNet:
    """CSP-ELAN darknet, width 0.5, depth 0.33."""
    return _create("s", pretrained, **kwargs)


@register_model
def cspelan_m(pretrained: bool = False, **kwargs) -> CSPElanNet:
    """CSP-ELAN darknet, width 0.75, depth 0.67."""
    return _create("m", pretrained, **kwargs)
