"""The conv blocks of the yolo family's backbone (:mod:`kdctl.models.cspelan`) and neck
(:mod:`kdctl.models.necks.pan`), with its width / depth multipliers and its BatchNorm setting.

  * :class:`ConvBNAct`: conv (no bias) -> BatchNorm -> SiLU (Elfwing et al., "Sigmoid-weighted
    linear units", 2018).
  * :class:`CSPBlock` — CSPNet (Wang et al., "CSPNet: A New Backbone that can Enhance Learning
    Capability of CNN", CVPRW 2020): two 1x1 convs split the input into halves, only one goes
    through the stacked blocks (Darknet's bottleneck, 1x1 then 3x3, without the residual
    shortcut, as necks built of CSP blocks use it; Redmon & Farhadi, "YOLOv3", 2018), and a 1x1
    transition conv reads both.
  * :class:`CSPELAN` — CSPNet's split with ELAN's aggregation (Wang et al., "YOLOv7", CVPR 2023;
    "Designing Network Design Strategies Through Gradient Path Analysis", 2022): the transition
    reads the output of *every* stacked :class:`Residual` block, not only the last.

Weights: PyTorch's default conv init, BatchNorm weight 1 and bias 0; :func:`set_batchnorm` sets
a module's BatchNorm momentum / eps after it is built.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["CSPBlock", "CSPELAN", "ConvBNAct", "Residual", "scaled_depth", "scaled_width", "set_batchnorm"]


def scaled_width(channels: int, multiple: float, divisor: int = 8) -> int:
    """``channels * multiple`` rounded up to a multiple of ``divisor`` (at least ``divisor``):
    the width multiplier of the yolo family (n 0.25, s 0.5, m 0.75 of a 256 base)."""
    return max(divisor, int(math.ceil(channels * multiple / divisor)) * divisor)


def scaled_depth(blocks: int, multiple: float) -> int:
    """``round(blocks * multiple)``, at least 1: bottlenecks per CSP block (n/s 0.33, m 0.67 of 3)."""
    return max(1, round(blocks * multiple))


class ConvBNAct(nn.Sequential):
    """``k x k`` conv (no bias, 'same' padding, ``stride``) -> BatchNorm2d -> SiLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.SiLU())


class CSPBlock(nn.Module):
    """Cross stage partial block (CSPNet): ``[B, in, H, W] -> [B, out, H, W]``.

    ``part1 = conv1x1(x)`` (``out // 2``) through ``depth`` Darknet bottlenecks (1x1 then 3x3,
    no shortcut), ``part2 = conv1x1(x)`` (``out // 2``) unchanged, then
    ``conv1x1(cat(part1, part2))``."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 1):
        super().__init__()
        hidden = max(out_channels // 2, 1)
        self.part1 = ConvBNAct(in_channels, hidden)
        self.part2 = ConvBNAct(in_channels, hidden)
        self.blocks = nn.Sequential(*(nn.Sequential(ConvBNAct(hidden, hidden, 1), ConvBNAct(hidden, hidden, 3))
                                      for _ in range(depth)))
        self.transition = ConvBNAct(2 * hidden, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.transition(torch.cat([self.blocks(self.part1(x)), self.part2(x)], dim=1))


class Residual(nn.Module):
    """Two 3x3 ConvBNAct on ``h`` channels, with the input added when ``shortcut`` (ResNet's basic block)."""

    def __init__(self, channels: int, shortcut: bool = True):
        super().__init__()
        self.conv1, self.conv2 = ConvBNAct(channels, channels, 3), ConvBNAct(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class CSPELAN(nn.Module):
    """CSP split + ELAN aggregation (see the module docstring; a 1x1 conv to ``2h`` channels split
    into halves, the second through ``depth`` blocks in sequence, the transition on the
    concatenation of both halves and every block's output, ``(2 + depth) h`` channels): ``[B, cin, H, W] -> [B, cout, H, W]``
    with ``h = cout // 2`` and ``depth`` blocks (:class:`Residual`, ``shortcut`` in the backbone,
    without it in necks)."""

    def __init__(self, cin: int, cout: int, depth: int = 1, shortcut: bool = True):
        super().__init__()
        h = max(cout // 2, 1)
        self.hidden = h
        self.split = ConvBNAct(cin, 2 * h)
        self.blocks = nn.ModuleList(Residual(h, shortcut) for _ in range(depth))
        self.transition = ConvBNAct((2 + depth) * h, cout)

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.split(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.transition(torch.cat(parts, dim=1))


def set_batchnorm(module: nn.Module, momentum: float | None, eps: float | None) -> nn.Module:
    """Every BatchNorm of ``module`` with this ``momentum`` / ``eps`` (None: left as built)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = m.momentum if momentum is None else momentum
            m.eps = m.eps if eps is None else eps
    return module
