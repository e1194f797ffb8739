"""Necks: backbone levels -> the levels a head runs on. A neck has ``out_channels``,
``num_outs`` and ``strides``; the detector takes its strides and widths from it."""
from kdctl.models.necks.fpn import FPN

__all__ = ["FPN"]
