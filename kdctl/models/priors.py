"""Priors of dense detectors: grid points (FCOS, GFL) and anchor boxes (RetinaNet, ATSS, GFL).

All coordinates are pixels of the (resized, padded) input image, boxes are xyxy.

Order. Every function returns all levels concatenated **level-major**, then **row-major**
inside a level (y outer, x inner), then, for anchors, the ``k`` anchors of one location
innermost. That is exactly the order in which a head's ``[B, k*C, H, W]`` output flattens with
``.permute(0, 2, 3, 1).reshape(B, -1, C)`` and the levels are concatenated, so prior ``i`` and
prediction ``i`` always refer to the same place.

Conventions, checked against MMDetection (open-mmlab/mmdetection, v2/v3):

* ``AnchorGenerator`` (mmdet/models/task_modules/prior_generators/anchor_generator.py) places
  the anchors of cell ``(x, y)`` centred at ``(x * stride, y * stride)`` (``center_offset=0``),
  with ``base_size = stride``. RetinaNet and ATSS/GFL anchors, and the "anchor centres" that GFL
  decodes its distances from, therefore use offset 0.
* ``MlvlPointGenerator`` (.../prior_generators/point_generator.py) defaults to
  ``offset=0.5``: FCOS points sit at ``((x + 0.5) * stride, (y + 0.5) * stride)``, the pixel
  centre of the cell. (mmdet v2.0's FCOSHead wrote this as ``x * stride + stride // 2``, equal
  for the even strides used here.) Call ``grid_points(..., offset=0.5)`` for FCOS.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Priors", "PriorGenerator", "grid_points", "base_anchors", "anchors", "num_anchors", "torchvision_priors",
           "FCOS_POINT_OFFSET"]

# (octave_base_scale, scales_per_octave, ratios) of mmdet's AnchorGenerator
AnchorConfig = tuple[float, int, tuple[float, ...]]

# MlvlPointGenerator's default offset (FCOS); anchors and GFL anchor centres use 0.
FCOS_POINT_OFFSET = 0.5


def grid_points(
    sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    offset: float = 0.0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Centres of every feature-map cell of every level.

    Args:
        sizes: ``(H, W)`` of each level's feature map.
        strides: stride of each level in pixels (8, 16, 32, 64, 128 for P3-P7).
        offset: position inside the cell as a fraction of the stride: 0.0 for anchor centres
            (mmdet ``AnchorGenerator``, used by RetinaNet/ATSS/GFL), 0.5 for FCOS points (mmdet
            ``MlvlPointGenerator`` default, :data:`FCOS_POINT_OFFSET`).
        device: where to create the tensors.

    Returns:
        points: float32 ``[A, 2]`` xy pixels, ``((x + offset) * s, (y + offset) * s)``.
        level: int64 ``[A]`` level index (0 for the first entry of ``sizes``).
        stride: float32 ``[A]`` stride of the point's level, pixels.

        ``A = sum(H * W)``; order level-major, then y, then x.
    """
    if len(sizes) != len(strides):
        raise ValueError(f"got {len(sizes)} feature sizes but {len(strides)} strides")
    points, levels, level_strides = [], [], []
    for lvl, ((h, w), s) in enumerate(zip(sizes, strides)):
        xs = (torch.arange(w, device=device, dtype=torch.float32) + offset) * s
        ys = (torch.arange(h, device=device, dtype=torch.float32) + offset) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each, row-major
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))
        levels.append(torch.full((h * w,), lvl, dtype=torch.int64, device=device))
        level_strides.append(torch.full((h * w,), float(s), dtype=torch.float32, device=device))
    return torch.cat(points), torch.cat(levels), torch.cat(level_strides)


def _octave_scales(octave_base_scale: float, scales_per_octave: int) -> Tensor:
    # mmdet: numpy float64 ``octave_base_scale * 2 ** (i / n)`` then torch.Tensor (float32).
    return torch.tensor(
        [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)],
        dtype=torch.float32,
    )


def base_anchors(
    stride: int,
    octave_base_scale: float,
    scales_per_octave: int,
    ratios: Sequence[float],
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``k = len(ratios) * scales_per_octave`` anchors of one location, centred at (0, 0).

    Follows mmdet's ``AnchorGenerator.gen_single_level_base_anchors`` with ``base_size = stride``,
    ``center_offset = 0`` and ``scale_major = True``:

    * scales ``octave_base_scale * 2 ** (i / scales_per_octave)``, ``i = 0 .. n-1``;
    * a ratio is ``h / w``: ``h = base * sqrt(ratio) * scale``, ``w = base / sqrt(ratio) * scale``;
    * order: **ratios outer, scales inner** (``ws = w * w_ratios[:, None] * scales[None, :]``).
      For RetinaNet (ratios 0.5, 1, 2; 3 scales) the 9 anchors are
      (r=0.5, s0), (r=0.5, s1), (r=0.5, s2), (r=1, s0), ..., (r=2, s2).

    Arithmetic is float32 in mmdet's order, so values match mmdet v2/v3 bit for bit. There is
    no rounding: mmdet v1's rounded, ``(size - 1) / 2``-centred anchors live only in its
    ``LegacyAnchorGenerator``, which kdctl does not reproduce.

    Returns:
        float32 ``[k, 4]`` xyxy pixels.
    """
    scales = _octave_scales(octave_base_scale, scales_per_octave).to(device)
    ratios_t = torch.tensor(list(ratios), dtype=torch.float32, device=device)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def num_anchors(scales_per_octave: int, ratios: Sequence[float]) -> int:
    """Anchors per location ``k`` (9 for RetinaNet, 1 for ATSS/GFL)."""
    return scales_per_octave * len(ratios)


def anchors(
    sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    octave_base_scale: float,
    scales_per_octave: int,
    ratios: Sequence[float],
    device: torch.device | str | None = None,
) -> Tensor:
    """Anchor boxes of every level, as mmdet's ``AnchorGenerator.grid_priors``.

    RetinaNet: ``octave_base_scale=4, scales_per_octave=3, ratios=(0.5, 1.0, 2.0)`` (k = 9).
    ATSS / GFL: ``octave_base_scale=8, scales_per_octave=1, ratios=(1.0,)`` (k = 1).

    Args:
        sizes: ``(H, W)`` of each level's feature map.
        strides: stride of each level in pixels; also the level's ``base_size``.
        octave_base_scale, scales_per_octave, ratios: see :func:`base_anchors`.

    Returns:
        float32 ``[A * k, 4]`` xyxy pixels, ``A = sum(H * W)``: level-major, then y, then x,
        then the k anchors of the location (ratios outer, scales inner). Anchors of cell
        ``(x, y)`` are centred at ``(x * stride, y * stride)``. Anchors of a level number
        ``H * W * k`` (what :class:`~kdctl.models.assigners.ATSSAssigner` calls
        ``num_level_priors``).
    """
    if len(sizes) != len(strides):
        raise ValueError(f"got {len(sizes)} feature sizes but {len(strides)} strides")
    out = []
    for (h, w), s in zip(sizes, strides):
        base = base_anchors(s, octave_base_scale, scales_per_octave, ratios, device)  # [k, 4]
        centres, _, _ = grid_points([(h, w)], [s], offset=0.0, device=device)  # [HW, 2]
        shifts = centres.repeat(1, 2)  # [HW, 4] as (x, y, x, y)
        out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    return torch.cat(out)


def torchvision_priors(
    sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    anchor_cfg: tuple[float, int, Sequence[float]] | None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Anchor centres and anchors as torchvision's ``AnchorGenerator`` makes them, for converted
    torchvision RetinaNet / FCOS weights (torchvision/models/detection/anchor_utils.py):

    * the grid step of a level is ``padded image size // feature size``, per axis. The padded
      input is ``strides[0] * sizes[0]`` (exact for inputs padded to a multiple of 32), so the
      step equals the nominal stride where the image divides by it and is smaller on P6/P7
      otherwise (e.g. 800 px: P6 has 13 rows, step 800 // 13 = 61);
    * centres at ``(x * step_x, y * step_y)`` (offset 0), level-major, row-major;
    * anchor sizes are integers ``int(base * 2 ** (i / n))`` with ``base = octave_base_scale *
      stride`` (RetinaNet: 32, 40, 50 on P3), and the base anchors are **rounded** to whole
      pixels, ratios outer and sizes inner. FCOS (``anchor_cfg`` None) has no anchors: its
      square ``stride`` anchors only give the centre and the normaliser (the nominal stride).

    Returns:
        points float32 ``[A * k, 2]`` xy pixels (each centre repeated k times) and anchors float32
        ``[A * k, 4]`` xyxy pixels (None without ``anchor_cfg``).
    """
    if len(sizes) != len(strides):
        raise ValueError(f"got {len(sizes)} feature sizes but {len(strides)} strides")
    img_h, img_w = sizes[0][0] * strides[0], sizes[0][1] * strides[0]
    points, boxes = [], []
    for (h, w), s in zip(sizes, strides):
        xs = torch.arange(w, device=device, dtype=torch.float32) * (img_w // w)
        ys = torch.arange(h, device=device, dtype=torch.float32) * (img_h // h)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)  # [HW, 2]
        if anchor_cfg is None:
            points.append(centres)
            continue
        octave_base, n, ratios = anchor_cfg
        base = int(octave_base * s)
        scales = torch.tensor([int(base * 2 ** (i / n)) for i in range(n)], dtype=torch.float32, device=device)
        h_ratios = torch.sqrt(torch.tensor(list(ratios), dtype=torch.float32, device=device))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        cell = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # [k, 4]
        k = cell.shape[0]
        boxes.append((centres.repeat(1, 2)[:, None, :] + cell[None]).reshape(-1, 4))
        points.append(centres.repeat_interleave(k, dim=0))
    return torch.cat(points), (torch.cat(boxes) if boxes else None)


@dataclass
class Priors:
    """The priors of one input size, all levels concatenated (N rows, in the order above).

    points   float32 [N, 2]  xy pixels: anchor centres (offset 0) or FCOS points (offset 0.5)
    stride   float32 [N]     stride of the row's level, pixels
    level    int64   [N]     level index (0 = the neck's first level)
    anchors  float32 [N, 4]  xyxy anchor boxes, or None for point priors
    num_level_priors  rows per level (``H_l * W_l * A``)
    """

    points: Tensor
    stride: Tensor
    level: Tensor
    anchors: Tensor | None
    num_level_priors: list[int]
    cells: Tensor | None = None  # int64 [N, 2]: (x, y) grid cell of the row on its level

    def valid_flags(self, pad_sizes: Tensor) -> Tensor:
        """bool ``[B, N]``: the prior's cell lies inside the image's own padded extent
        (``pad_sizes`` int64 ``[B, 2]``, (h, w): the image's resized size rounded up to the pad
        divisor, not the batch's), as MMDetection's ``AnchorGenerator.valid_flags`` with the
        ``pad_shape`` that ``DetDataPreprocessor`` stores per image: cell ``(x, y)`` of a level
        with stride ``s`` is valid iff ``x < ceil(w / s)`` and ``y < ceil(h / s)``. With
        ``allowed_border=-1`` (every official config) these are the anchor heads' inside flags."""
        if self.cells is None:
            raise ValueError("these priors carry no grid cells; make them with PriorGenerator")
        s = self.stride.round().long()  # [N]
        pad = pad_sizes.to(device=s.device, dtype=torch.long)
        lim_y = torch.div(pad[:, 0:1] + s - 1, s, rounding_mode="floor")  # [B, N] ceil(h / s)
        lim_x = torch.div(pad[:, 1:2] + s - 1, s, rounding_mode="floor")
        return (self.cells[:, 0] < lim_x) & (self.cells[:, 1] < lim_y)


class PriorGenerator:
    """Makes (and caches per feature size) the :class:`Priors` of a detector.

    Args:
        strides: the neck's level strides, pixels (e.g. 8 .. 128 for P3-P7).
        anchor_cfg: ``(octave_base_scale, scales_per_octave, ratios)`` of mmdet's
            ``AnchorGenerator``, or None for points (one per location, no anchors).
        point_offset: position of the points inside the cell, in strides (0 anchors, 0.5 FCOS).
        style: "mmdet", or "torchvision" (:func:`torchvision_priors`, converted torchvision weights).
    """

    def __init__(self, strides: Sequence[int], anchor_cfg: AnchorConfig | None, point_offset: float = 0.0,
                 style: str = "mmdet"):
        self.strides = list(strides)
        self.anchor_cfg = anchor_cfg
        self.point_offset = point_offset
        self.style = style
        self._cache: dict[tuple, Priors] = {}

    @property
    def anchors_per_location(self) -> int:
        """A: priors per feature-map location."""
        return 1 if self.anchor_cfg is None else num_anchors(self.anchor_cfg[1], self.anchor_cfg[2])

    def __call__(self, sizes: Sequence[tuple[int, int]], device: torch.device) -> Priors:
        """Priors for feature maps of ``sizes`` (``(H_l, W_l)`` per level), cached per size."""
        key = (tuple(tuple(int(v) for v in s) for s in sizes), str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        k = self.anchors_per_location
        strides = self.strides[: len(sizes)]
        points, level, stride = grid_points(key[0], strides, self.point_offset, device)
        boxes = None
        if self.style == "torchvision":  # same rows, other positions and anchor shapes
            points, boxes = torchvision_priors(key[0], strides, self.anchor_cfg, device)
            level, stride = (t.repeat_interleave(k, dim=0) for t in (level, stride))
        elif self.anchor_cfg is not None:
            base, n_scales, ratios = self.anchor_cfg
            boxes = anchors(key[0], strides, base, n_scales, ratios, device)
            points, level, stride = (t.repeat_interleave(k, dim=0) for t in (points, level, stride))
        cells = torch.cat([torch.stack(torch.meshgrid(torch.arange(w, device=device), torch.arange(h, device=device),
                                                      indexing="xy"), dim=-1).reshape(-1, 2) for h, w in key[0]])
        pri = Priors(points, stride, level, boxes, [h * w * k for h, w in key[0]], cells.repeat_interleave(k, dim=0))
        if len(self._cache) > 64:  # many input sizes (multi-scale eval): keep the cache bounded
            self._cache.clear()
        self._cache[key] = pri
        return pri
