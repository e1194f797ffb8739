"""YOLO-style training augmentation (``data.augment``): mosaic, random affine, HSV jitter.

Written from the descriptions in YOLOv4 (Bochkovskiy, Wang and Liao, 2020): *mosaic* mixes four
training images into one, so objects are seen outside their usual context and batch
normalisation sees four images per sample; the "bag of freebies" adds photometric distortions
(hue, saturation, value) and geometric ones (random scaling, translation, rotation).

One training sample (:class:`AugmentedDataset`), uint8 in and out of steps 1-3 (the warp and the
HSV jitter in float, rounded once):

1. With probability ``mosaic``: the sample and three partners drawn from the whole dataset, each
   resized as evaluation resizes it (keep ratio, ``short_side`` / ``max_side``), placed around a
   random centre ``(xc, yc)`` in ``[S/2, 3S/2]²`` of a ``2S x 2S`` canvas (``S = short_side``)
   filled with the mean colour: the sample's bottom-right corner at the centre, the partners'
   bottom-left, top-right and top-left corners there, so each fills part of its own quadrant;
   what passes the canvas border is cut off.
   The output is ``S x S``. Otherwise the sample alone, resized the same way; the output keeps
   its size.
2. A random affine maps the canvas into the output: scale ``s ~ U(scale)`` and rotation
   ``~ U(-degrees, degrees)`` about the canvas centre, which lands on the output centre shifted
   by ``U(-translate, translate)`` of the output side per axis. Bilinear; the mean colour outside.
3. HSV: hue ``+ U(-hsv_h, hsv_h)`` (a fraction of the colour circle), saturation and value
   multiplied by ``U(1 - hsv_s, 1 + hsv_s)`` and ``U(1 - hsv_v, 1 + hsv_v)``, clipped to [0, 1].
4. Then what every training sample gets: horizontal flip (``data.hflip``) and normalisation.

**Boxes** move with the pixels: the four corners of a box through the same affine, the box is
their enclosing box, clipped to the output. A box is kept when its clipped part is at least
``min_size`` pixels wide and high (``data.min_box_size``, and never empty) and keeps at least
``min_visible`` of the area of the whole moved box, as if neither the canvas border nor the
output had cut it. Ignore regions move the same way and are kept when any part is left.

**Determinism.** Every draw of a sample (mosaic or not, partners, centre, affine, HSV) comes from
one generator seeded by a number drawn from the process RNG when the sample starts; under
:class:`kdctl.engine.loader.SeededDataset` that RNG is seeded with the sample seed of
:class:`~kdctl.engine.loader.EpochBatchSampler`, a function of (seed, epoch, index) only, so
``--resume`` sees the same mosaics. The flip after it draws from the process RNG, as without
augmentation. ``close_epochs``: :meth:`AugmentedDataset.set_epoch` switches to the plain samples
(the base dataset's own transforms) for the last epochs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from kdctl.data.transforms import ToFloatNormalize, keep_ratio_size, pad_colour
from kdctl.errors import DataError


# ============================================================================= geometry
def affine_matrix(in_size: tuple[int, int], out_size: tuple[int, int], scale: float = 1.0, degrees: float = 0.0,
                  translate: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """float64 ``[2, 3]`` mapping input pixels to output pixels (continuous coordinates, pixel
    edges at integers): rotate by ``degrees`` (counter-clockwise on screen) and scale by ``scale``
    about the centre of ``in_size = (h, w)``, which lands on the centre of ``out_size`` shifted by
    ``translate = (tx, ty)`` output widths / heights."""
    (ih, iw), (oh, ow) = in_size, out_size
    a = math.radians(degrees)
    c, s = scale * math.cos(a), scale * math.sin(a)
    lin = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)  # y points down: +degrees is counter-clockwise
    centre_out = torch.tensor([ow / 2 + translate[0] * ow, oh / 2 + translate[1] * oh], dtype=torch.float64)
    shift = centre_out - lin @ torch.tensor([iw / 2, ih / 2], dtype=torch.float64)
    return torch.cat([lin, shift[:, None]], dim=1)


def warp_affine(image: torch.Tensor, matrix: torch.Tensor, out_size: tuple[int, int], fill: Sequence[float]) -> torch.Tensor:
    """Float ``[3, oh, ow]`` (0..255): ``image`` (``[3, H, W]``, any dtype) warped by ``matrix``
    (``[2, 3]`` input -> output pixels), bilinear, ``fill`` (one value per channel) where the
    output sees no input. Each output pixel centre is mapped back through the inverse; only the
    part of the input the output sees (plus a pixel for the bilinear neighbours) is read."""
    oh, ow = out_size
    H, W = int(image.shape[-2]), int(image.shape[-1])
    bottom = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    inv = torch.linalg.inv(torch.cat([matrix.double(), bottom]))
    corners = torch.tensor([[0.0, ow, 0.0, ow], [0.0, 0.0, oh, oh], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    src = inv[:2] @ corners
    x0, y0 = max(0, math.floor(src[0].min()) - 1), max(0, math.floor(src[1].min()) - 1)
    x1, y1 = min(W, math.ceil(src[0].max()) + 1), min(H, math.ceil(src[1].max()) + 1)
    fill_t = torch.tensor([float(f) for f in fill], dtype=torch.float32).view(-1, 1, 1)
    if x1 <= x0 or y1 <= y0:  # the output sees none of the input
        return fill_t.expand(-1, oh, ow).clone()
    crop = image[:, y0:y1, x0:x1]
    ch, cw = y1 - y0, x1 - x0
    # normalised output coords -> output pixels -> input pixels -> crop pixels -> normalised crop
    # coords (align_corners=False: pixel i's centre is at (2 i + 1) / size - 1)
    from_norm = torch.tensor([[ow / 2, 0.0, ow / 2], [0.0, oh / 2, oh / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    to_norm = torch.tensor([[2 / cw, 0.0, -2 * x0 / cw - 1], [0.0, 2 / ch, -2 * y0 / ch - 1], [0.0, 0.0, 1.0]],
                           dtype=torch.float64)
    theta = (to_norm @ inv @ from_norm)[:2].tolist()
    xn = (torch.arange(ow, dtype=torch.float32) * 2 + 1) / ow - 1  # [ow] normalised output x of pixel centres
    yn = ((torch.arange(oh, dtype=torch.float32) * 2 + 1) / oh - 1)[:, None]  # [oh, 1]
    grid = torch.empty(1, oh, ow, 2)
    for i in range(2):  # one broadcast add per coordinate, written in place
        torch.add(theta[i][0] * xn + theta[i][2], theta[i][1] * yn, out=grid[0, :, :, i])
    shifted = crop.float().sub_(fill_t)[None]  # zero padding of the shifted image = fill outside
    out = torch.nn.functional.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].add_(fill_t)


def move_boxes(boxes: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """xyxy ``[N, 4]`` -> ``[N, 4]``: the enclosing box of each box's four corners moved by
    ``matrix`` (``[2, 3]``)."""
    m = matrix.to(torch.float32)
    x1, y1, x2, y2 = boxes.float().unbind(-1)
    xs = torch.stack([x1, x2, x2, x1], dim=-1)  # [N, 4] corners
    ys = torch.stack([y1, y1, y2, y2], dim=-1)
    X = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    Y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    return torch.stack([X.amin(-1), Y.amin(-1), X.amax(-1), Y.amax(-1)], dim=-1)


def clip_boxes_kept(whole: torch.Tensor, visible: torch.Tensor, size: tuple[int, int], min_size: float,
                    min_visible: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip ``visible`` (xyxy ``[N, 4]``, the part of each box not yet cut away) to ``size = (h,
    w)`` and decide which boxes stay: clipped width and height both ``> 0`` and ``>= min_size``,
    and clipped area ``>= min_visible`` times the area of ``whole`` (``[N, 4]``, the same boxes
    uncut). Returns ``(clipped [N, 4], keep [N] bool)``."""
    h, w = size
    out = torch.stack([visible[:, 0].clamp(0, w), visible[:, 1].clamp(0, h),
                       visible[:, 2].clamp(0, w), visible[:, 3].clamp(0, h)], dim=-1)
    bw, bh = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    area_whole = (whole[:, 2] - whole[:, 0]).clamp(min=0) * (whole[:, 3] - whole[:, 1]).clamp(min=0)
    keep = (bw > 0) & (bh > 0) & (bw >= min_size) & (bh >= min_size) & (bw * bh >= min_visible * area_whole)
    return out, keep


# ============================================================================= colour
def jitter_hsv(image: torch.Tensor, hue: float, sat: float, val: float) -> torch.Tensor:
    """Float ``[3, H, W]`` RGB on 0..255 -> the same with the HSV hue shifted by ``hue`` (a
    fraction of the circle) and saturation and value multiplied by ``sat`` and ``val`` (clipped to
    1). One pass through HSV without its bool-mask selections (slow on the CPU): the hue in
    sixths from the sector of the largest channel, then channel n of (R, G, B) = (5, 3, 1) is
    ``v - v s clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6``."""
    r, g, b = image.unbind(0)
    v, low = image.amax(0), image.amin(0)
    delta = v - low
    d = delta.clamp(min=1e-6)  # greys (delta 0) get hue 0; their saturation is 0 anyway
    is_r = (v == r).float()
    is_g = (v == g).float().mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h6 = (is_r * (g - b) + is_g * (b - r + 2.0 * d) + is_b * (r - g + 4.0 * d)) / d  # hue in sixths, in [-1, 5)
    s_new = (delta / v.clamp(min=1e-6)).mul_(sat).clamp_(0.0, 1.0)
    v_new = (v * val).clamp_(0.0, 255.0)
    n = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)
    k = torch.remainder(n + (h6 + 6.0 * hue), 6.0)
    return v_new - torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(v_new * s_new)


# ============================================================================= dataset
class AugmentedDataset(torch.utils.data.Dataset):
    """Training samples of ``base`` (a :class:`~kdctl.data.dataset.DetectionDataset`) with mosaic,
    random affine and HSV jitter, as the module docstring describes; while :meth:`set_epoch` has
    switched it off, ``base[idx]`` itself (the base dataset's own transforms).

    Args: ``mosaic`` probability; ``scale`` (low, high); ``translate`` fraction of the output
    side; ``degrees`` rotation range; ``hsv`` (hue, saturation, value) ranges; ``short_side``,
    ``max_side`` the keep-ratio resize (pixels); ``fill`` uint8 colour of empty canvas;
    ``min_size`` pixels and ``min_visible`` share (the box rule); ``post`` the transform applied
    last (flip, normalise); ``off_from_epoch`` the first epoch with plain samples (None: never).
    """

    def __init__(self, base, *, mosaic: float, scale: tuple[float, float], translate: float, degrees: float,
                 hsv: tuple[float, float, float], short_side: int, max_side: int, fill: Sequence[int],
                 min_size: float, min_visible: float, post, off_from_epoch: int | None = None):
        self.base = base
        self.mosaic, self.scale, self.translate, self.degrees = float(mosaic), tuple(scale), float(translate), float(degrees)
        self.hsv = tuple(float(x) for x in hsv)
        self.short_side, self.max_side, self.fill = int(short_side), int(max_side), tuple(int(f) for f in fill)
        self.min_size, self.min_visible = float(min_size), float(min_visible)
        self.post = post
        self.off_from_epoch = off_from_epoch
        self.active = True

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> bool:
        """Switch on or off for ``epoch``; True when that changed the state (a loader with
        persistent workers must then restart them, which copy the dataset when they start)."""
        active = self.off_from_epoch is None or epoch < self.off_from_epoch
        changed = active != self.active
        self.active = active
        return changed

    def __getitem__(self, idx: int) -> dict:
        if not self.active:
            return self.base[idx]
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        try:
            sample = self.augment(idx, g)
        except DataError as exc:  # an image of the mosaic failed to decode: skipped as the base skips it
            return self.base.unreadable(idx, exc)
        return self.post(sample)

    # ------------------------------------------------------------------ one sample
    def _resized(self, idx: int) -> dict:
        """``base.load_sample(idx)`` resized as evaluation resizes it (keep ratio, bilinear, antialias)."""
        s = self.base.load_sample(idx)
        h, w = (int(v) for v in s["image"].shape[-2:])
        nh, nw = keep_ratio_size(h, w, self.short_side, self.max_side)
        factor = torch.tensor([nw / w, nh / h, nw / w, nh / h])
        return {**s, "image": F.resize(s["image"].as_subclass(torch.Tensor), [nh, nw], antialias=True),
                "boxes": s["boxes"].as_subclass(torch.Tensor) * factor,
                "ignore": s["ignore"].as_subclass(torch.Tensor) * factor}

    def augment(self, idx: int, g: torch.Generator) -> dict:
        """The uint8 sample ``idx`` after steps 1-3 of the module docstring, every draw from ``g``."""
        u = torch.rand(7, generator=g, dtype=torch.float64).tolist()
        partners = torch.randint(0, len(self.base), (3,), generator=g).tolist()
        first = self._resized(idx)
        if u[0] < self.mosaic:
            canvas, parts, out_size = self._mosaic([first] + [self._resized(j) for j in partners], u[1], u[2])
            orig_size = out_size
        else:
            canvas = first["image"]
            out_size = tuple(int(v) for v in canvas.shape[-2:])
            parts = [(first, first["boxes"], first["boxes"], first["ignore"])]
            orig_size = first["orig_size"]
        lo, hi = self.scale
        matrix = affine_matrix(tuple(canvas.shape[-2:]), out_size, scale=lo + (hi - lo) * u[3],
                               degrees=self.degrees * (2 * u[4] - 1),
                               translate=(self.translate * (2 * u[5] - 1), self.translate * (2 * u[6] - 1)))
        hue, sat, val = self.hsv
        gains = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        image = warp_affine(canvas, matrix, out_size, self.fill)
        if hue or sat or val:
            image = jitter_hsv(image, hue * (2 * gains[0] - 1), 1 + sat * (2 * gains[1] - 1), 1 + val * (2 * gains[2] - 1))
        image = image.round_().clamp_(0, 255).to(torch.uint8)

        boxes, labels, ignore, ignore_labels = [], [], [], []
        for sample, whole, visible, ign in parts:
            b, keep = clip_boxes_kept(move_boxes(whole, matrix), move_boxes(visible, matrix), out_size,
                                      self.min_size, self.min_visible)
            boxes.append(b[keep])
            labels.append(sample["labels"][keep])
            moved = move_boxes(ign, matrix)
            i, keep_i = clip_boxes_kept(moved, moved, out_size, 0.0, 0.0)
            ignore.append(i[keep_i])
            ignore_labels.append(sample["ignore_labels"][keep_i])
        return {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY", canvas_size=out_size),
            "labels": torch.cat(labels),
            "ignore": tv_tensors.BoundingBoxes(torch.cat(ignore), format="XYXY", canvas_size=out_size),
            "ignore_labels": torch.cat(ignore_labels),
            "image_id": first["image_id"],
            "orig_size": orig_size,
        }

    def _mosaic(self, samples: list[dict], ux: float, uy: float):
        """The ``2S x 2S`` canvas of four resized samples around the centre ``S/2 + S * (ux, uy)``,
        each cut at the canvas border; returns ``(canvas uint8 [3, 2S, 2S], [(sample, whole boxes,
        visible boxes, ignore)] in canvas pixels, (S, S))``."""
        S = self.short_side
        C = 2 * S
        xc, yc = int(S / 2 + S * ux), int(S / 2 + S * uy)
        canvas = torch.tensor(self.fill, dtype=torch.uint8).view(-1, 1, 1).expand(3, C, C).clone()
        parts = []
        for k, s in enumerate(samples):
            h, w = (int(v) for v in s["image"].shape[-2:])
            x0 = xc - w if k in (0, 2) else xc  # 0: top-left, 1: top-right, 2: bottom-left, 3: bottom-right
            y0 = yc - h if k in (0, 1) else yc
            vx0, vy0, vx1, vy1 = max(x0, 0), max(y0, 0), min(x0 + w, C), min(y0 + h, C)
            canvas[:, vy0:vy1, vx0:vx1] = s["image"][:, vy0 - y0:vy1 - y0, vx0 - x0:vx1 - x0]
            shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            whole = s["boxes"] + shift
            lo = torch.tensor([vx0, vy0, vx0, vy0], dtype=torch.float32)
            hi = torch.tensor([vx1, vy1, vx1, vy1], dtype=torch.float32)
            visible = torch.minimum(torch.maximum(whole, lo), hi)
            ignore = torch.minimum(torch.maximum(s["ignore"] + shift, lo), hi)
            parts.append((s, whole, visible, ignore))
        return canvas, parts, (S, S)


def build_augmented(dataset, data, epochs: int, mean: Sequence[float], std: Sequence[float]) -> AugmentedDataset | None:
    """The training dataset of ``data.augment`` (a :class:`kdctl.recipe.DataConfig`) over
    ``dataset``, or None when ``data.augment`` is off (the default: train on ``dataset``
    itself, unchanged). ``epochs``: ``train.epochs`` (the last ``close_epochs`` are plain);
    ``mean`` / ``std``: the model's normalisation (the fill colour is the mean)."""
    a = data.augment
    if a is None:
        return None
    post = v2.Compose(([v2.RandomHorizontalFlip(p=data.hflip)] if data.hflip > 0 else []) + [ToFloatNormalize(mean, std)])
    return AugmentedDataset(
        dataset, mosaic=a.mosaic, scale=a.scale, translate=a.translate, degrees=a.degrees, hsv=(a.hsv_h, a.hsv_s, a.hsv_v),
        short_side=data.short_side, max_side=data.max_side, fill=pad_colour(mean), min_size=data.min_box_size,
        min_visible=a.min_visible, post=post, off_from_epoch=epochs - a.close_epochs if a.close_epochs else None)
