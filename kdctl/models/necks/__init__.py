"""Necks: backbone levels -> the levels a head runs on. A neck has ``out_channels`` (one
width, or a list of one per level: :func:`level_widths`), ``num_outs`` and ``strides``; the detector takes its strides and widths from it."""
from kdctl.models.necks.fpn import FPN
from kdctl.models.necks.pan import PAN, level_widths

__all__ = ["FPN", "PAN", "level_widths"]
