"""Path Aggregation Network neck with CSP blocks: C3-C5 -> P3-P5, one width or one per level.

Papers:
  * PANet — Liu et al., "Path Aggregation Network for Instance Segmentation", CVPR 2018: an FPN
    top-down path, then a bottom-up "augmented path" in which each level takes the finer output
    through a stride-2 3x3 conv and fuses it with the top-down map of its own level. PANet keeps
    one width (256) for every level; this neck keeps one (``out_channels`` an int) or one per
    level (a list), which the per-level head towers and distillation adapters take as they are.
  * The fusion blocks, CSP (CSPNet) or CSP-ELAN (CSPNet + ELAN): :mod:`kdctl.models.blocks`.
  * Fusion by concatenation instead of PANet's addition, and a CSP block as each fusion conv:
    Bochkovskiy et al., "YOLOv4", 2020 (their "modified PAN").

Every conv is conv (no bias) -> BatchNorm -> SiLU (Elfwing et al., "Sigmoid-weighted linear
units", 2018). Layout, ``w = out_channels``, ``d`` = bottlenecks per CSP block:

    T5 = conv1x1(C5 -> w5)
    T4 = CSP(cat(up(T5), C4) -> w4, d)           top-down (nearest upsampling to the exact size)
    N3 = CSP(cat(up(T4), C3) -> w3, d)           = P3
    N4 = CSP(cat(conv3x3/2(N3), T4) -> w4, d)    bottom-up (PANet's augmented path)
    N5 = CSP(cat(conv3x3/2(N4), T5) -> w5, d)

with ``w3 = w4 = w5 = w`` (one width, PANet's) or one width per level (``[w, 2w, 4w]``:
YOLOv4's modified PAN keeps the backbone's pyramid of widths).

Width and depth multipliers (the n / s / m sizes of real-time detectors) are applied by the
builder (:func:`scaled_width`, :func:`scaled_depth`); the module takes the resulting plain
numbers. Weights: PyTorch's default conv init, BatchNorm weight 1 and bias 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdctl.models.blocks import CSPELAN, CSPBlock, ConvBNAct, scaled_depth, scaled_width

__all__ = ["PAN", "CSPBlock", "ConvBNAct", "level_widths", "scaled_width", "scaled_depth"]


def _fit(x: Tensor, like: Tensor) -> Tensor:
    """``x`` resized (nearest) to ``like``'s spatial size when they differ (odd input sizes)."""
    return x if x.shape[-2:] == like.shape[-2:] else F.interpolate(x, size=like.shape[-2:], mode="nearest")


def level_widths(channels: int | Sequence[int], levels: int) -> list[int]:
    """A neck's ``out_channels`` as one width per level (a uniform neck has one int)."""
    return [int(c) for c in channels] if isinstance(channels, (list, tuple)) else [int(channels)] * levels


class PAN(nn.Module):
    """C3-C5 -> P3-P5 (see the module docstring).

    Args:
        in_channels: channels of C3, C4, C5 (``Backbone.channels``).
        out_channels: the width of every output level (the head's ``in_channels``), or one width
            per level (P3, P4, P5): YOLOv4's modified PAN keeps the backbone's pyramid of widths
            (128 / 256 / 512 there), where PANet keeps one.
        depth: blocks per fusion block.
        in_strides: the input strides, pixels (``Backbone.strides``); the outputs have the same.
        block: the fusion block: ``"csp"`` (:class:`CSPBlock`) or ``"elan"``
            (:class:`kdctl.models.blocks.CSPELAN` without shortcuts: every block's output
            aggregated).

    Attributes (a neck's interface): ``out_channels`` (an int, or the list when the widths
    differ), ``num_outs`` (3), ``strides``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int | Sequence[int], depth: int = 1,
                 in_strides: Sequence[int] = (8, 16, 32), block: str = "csp"):
        super().__init__()
        if len(in_channels) != 3 or len(in_strides) != 3:
            raise ValueError(f"PAN takes three input levels (C3-C5), got channels {list(in_channels)}")
        if block == "csp":
            fuse = CSPBlock
        elif block == "elan":
            def fuse(cin, cout, d):
                return CSPELAN(cin, cout, d, shortcut=False)
        else:
            raise ValueError(f"block must be 'csp' or 'elan', got {block!r}")
        c3, c4, c5 = in_channels
        w3, w4, w5 = level_widths(out_channels, 3)
        self.out_channels = out_channels if isinstance(out_channels, int) else [w3, w4, w5]
        self.num_outs = 3
        self.strides = list(in_strides)
        self.lateral5 = ConvBNAct(c5, w5)
        self.top_down4 = fuse(w5 + c4, w4, depth)
        self.top_down3 = fuse(w4 + c3, w3, depth)
        self.down3 = ConvBNAct(w3, w3, 3, stride=2)
        self.bottom_up4 = fuse(w3 + w4, w4, depth)
        self.down4 = ConvBNAct(w4, w4, 3, stride=2)
        self.bottom_up5 = fuse(w4 + w5, w5, depth)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """``[C3, C4, C5]`` -> ``[P3, P4, P5]``, each ``[B, width_l, H_l, W_l]``."""
        c3, c4, c5 = feats
        t5 = self.lateral5(c5)
        t4 = self.top_down4(torch.cat([_fit(t5, c4), c4], dim=1))
        n3 = self.top_down3(torch.cat([_fit(t4, c3), c3], dim=1))
        n4 = self.bottom_up4(torch.cat([_fit(self.down3(n3), t4), t4], dim=1))
        n5 = self.bottom_up5(torch.cat([_fit(self.down4(n4), t5), t5], dim=1))
        return [n3, n4, n5]
