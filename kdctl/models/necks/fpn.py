"""Feature Pyramid Network neck: C3-C5 -> P3-P7 (Lin et al., 2017), as MMDetection builds it.

Layout (MMDetection ``FPN(start_level=1, num_outs=5, add_extra_convs=...)``):

- P3-P5: lateral 1x1 convs, a top-down pathway that adds each coarser lateral upsampled
  (nearest, to the finer map's exact size, so odd sizes work), then a 3x3 output conv.
- P6: a stride-2 3x3 conv on C5 (``extra_from="c5"``, mmdet ``add_extra_convs='on_input'``)
  or on P5 (``extra_from="p5"``, mmdet ``'on_output'``).
- P7: a stride-2 3x3 conv on P6, with a ReLU before it when ``relu_before_p7`` (mmdet
  ``relu_before_extra_convs=True``: in mmdet's FPN.forward that ReLU is applied only before
  the second and later extra convs, never before P6's).

Each family says which extra-level rule its MMDetection config uses (``Family.fpn_extra``).
Convs have biases and no norm; weights are xavier-uniform with zero bias (mmdet's FPN
``init_cfg``).

A neck's interface (what :class:`~kdctl.models.detector.Detector` reads): ``out_channels``,
``num_outs`` and ``strides`` (one per output level, pixels).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

class FPN(nn.Module):
    """C3-C5 (or any number of backbone levels) -> that many P maps plus P6 and P7.

    Args:
        in_channels: channels of the input levels, finest first (``Backbone.channels``).
        out_channels: channels of every output level.
        extra_from: ``"c5"`` (RetinaNet) or ``"p5"`` (FCOS, ATSS, GFL): the input of P6's conv.
        relu_before_p7: apply ReLU to P6 before P7's conv (FCOS).
        in_strides: strides of the input levels (the backbone's), pixels; P6 and P7 double the last.

    Forward: ``[C3, C4, C5]`` with ``[B, in_channels[i], H_i, W_i]`` -> ``[P3, ..., P7]`` with
    ``[B, out_channels, H_l, W_l]``; P3-P5 keep the input sizes, P6/P7 are
    ``ceil(H/2)`` of the level below.
    """

    num_extra = 2

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        extra_from: Literal["c5", "p5"] = "p5",
        relu_before_p7: bool = False,
        in_strides: Sequence[int] = (8, 16, 32),
    ):
        super().__init__()
        if extra_from not in ("c5", "p5"):
            raise ValueError(f"extra_from must be 'c5' or 'p5', got {extra_from!r}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.extra_from = extra_from
        self.relu_before_p7 = relu_before_p7
        self.num_outs = len(self.in_channels) + self.num_extra
        if len(in_strides) != len(self.in_channels):
            raise ValueError(f"got {len(in_strides)} input strides for {len(self.in_channels)} input levels")
        self.strides = [*map(int, in_strides), int(in_strides[-1]) * 2, int(in_strides[-1]) * 4]
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels)
        p6_in = self.in_channels[-1] if extra_from == "c5" else out_channels
        self.extra_convs = nn.ModuleList([
            nn.Conv2d(p6_in, out_channels, 3, stride=2, padding=1),
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1),
        ])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """``[C3, C4, C5]`` -> ``[P3, P4, P5, P6, P7]``, each ``[B, out_channels, H_l, W_l]``."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"FPN built for {len(self.in_channels)} levels, got {len(feats)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down, coarse to fine
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.output_convs, laterals)]
        p6 = self.extra_convs[0](feats[-1] if self.extra_from == "c5" else outs[-1])
        p7 = self.extra_convs[1](F.relu(p6) if self.relu_before_p7 else p6)
        return [*outs, p6, p7]
