"""Necks: backbone levels -> the levels a head runs on. A neck has ``out_channels``,
``num_outs`` and ``strides``; the detector takes its strides and widths from it."""
from kdctl.models.necks.fpn import FPN
from kdctl.models.necks.pan import PAN

__all__ = ["FPN", "PAN"]
