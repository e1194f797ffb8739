"""A built-in procedural detection dataset: shapes on cluttered, textured, noisy backgrounds.

Nothing is read from or written to disk (``kdctl.data.export.write_images`` writes PNGs). Image ``i`` is fully
determined by ``np.random.default_rng([seed, i])``: the generator first draws the *layout*
(background, clutter, objects with class, position, size, rotation, colours and texture), then
the per-pixel noise. Records are built at construction from the layout alone (object masks are
rasterised on small windows to get truthful boxes; no textures, no noise), and
:meth:`ShapesDataset.load_image` re-draws the same layout and renders the pixels.

What makes it a detection task rather than a colour-matching one:

* class is decided by shape only: object colours and textures are random per object;
* sizes are log-uniform from 8 px to half the image side, so about a quarter of all objects
  are 16 px or smaller and some are large;
* objects are painted in order and later layers occlude earlier ones; a box is the tight box of
  the *visible* pixels of the object's own silhouette; an object less than
  :data:`MIN_VISIBLE` visible (image borders count as hiding) gets no box; if any of it shows
  it becomes an ignore region instead, so neither a hit nor a miss on it is scored;
* clutter: irregular blobs and line segments under the objects, thin lines over them;
* backgrounds: two-colour gradients, low-contrast stripes or checkers, uniform pixel noise.

Rendering is vectorised numpy on per-object windows: about 1-2 ms per 256x256 image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdctl.data.dataset import DetectionDataset, ImageRecord, LoadReport, sanitize_boxes
from kdctl.errors import KdctlError

# Label index = position. The first ten are the default class set.
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "ellipse", "arrow", "crescent", "pentagon")
MIN_OBJECT_PX = 8.0  # smallest nominal object size (circumscribed diameter), pixels
MAX_OBJECT_FRAC = 0.5  # largest nominal object size, as a fraction of the image side
MIN_VISIBLE = 0.3  # an object less visible than this (fraction of its own area) gets no box
MIN_IGNORE_PX = 4  # ... and becomes an ignore region if at least this many pixels show
CLUSTER_P = 0.35  # chance that an object is placed touching / overlapping an earlier one


@dataclass
class _Shape:
    """One painted layer: an object (``label >= 0``) or clutter (``label == -1``).

    Geometry is in image pixels: centre ``(cx, cy)``, nominal size ``size`` (the diameter of the
    unit shape), rotation ``rot`` (radians), ``stretch`` (scale of the local v axis) and ``params``
    (shape-specific, in units of the half size). Colours are RGB floats on 0..255.
    """

    kind: str
    label: int
    cx: float
    cy: float
    size: float
    rot: float
    stretch: float
    params: tuple
    colour: np.ndarray  # [3]
    colour2: np.ndarray  # [3], second colour of gradient / stripe textures
    texture: int  # 0 solid, 1 linear gradient, 2 stripes
    tex_angle: float
    tex_period: float  # stripe period, pixels

    def window(self) -> tuple[int, int, int, int]:
        """Integer pixel window ``(x0, y0, x1, y1)`` holding the whole shape (may leave the image)."""
        base = math.sqrt(2.0) if self.kind == "square" else 0.75 * (1.0 + sum(self.params[0])) if self.kind == "blob" else 1.1
        r = 0.5 * self.size * base * max(1.0, self.stretch) + 1.0
        return math.floor(self.cx - r), math.floor(self.cy - r), math.ceil(self.cx + r) + 1, math.ceil(self.cy + r) + 1


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One colour, h/s/v in [0, 1] -> RGB float32 [3] on 0..255."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (255.0 * rgb).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(rng.random(), rng.uniform(0.15, 1.0), rng.uniform(0.2, 1.0))


def _star_inside(u: np.ndarray, v: np.ndarray, n: int, inner: float) -> np.ndarray:
    """Inside test for a regular n-gon (``inner = cos(pi/n)``) or an n-point star (smaller
    ``inner``) with unit outer radius and a vertex on the +u axis. Folds each point into the
    half sector ``[0, pi/n]`` and tests it against the edge from (1, 0) to the inner vertex."""
    rho = np.hypot(u, v)
    w = 2.0 * math.pi / n
    phi = np.mod(np.arctan2(v, u), w)
    phi = np.minimum(phi, w - phi)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    bx, by = inner * math.cos(w / 2), inner * math.sin(w / 2)
    return (bx - 1.0) * py - by * (px - 1.0) >= 0.0


def _local_coords(sh: _Shape, x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre offsets from the shape centre (``dx [1, w]``, ``dy [h, 1]``, pixels) and the
    rotated, normalised local coordinates ``u, v [h, w]`` (unit = half the nominal size)."""
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - sh.cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - sh.cy)[:, None]
    c, s, half = math.cos(sh.rot), math.sin(sh.rot), 0.5 * sh.size
    u = (dx * c + dy * s) / half
    v = (dy * c - dx * s) / (half * sh.stretch)
    return dx, dy, u, v


def _shape_mask(sh: _Shape, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean silhouette ``[h, w]`` of ``sh`` from its local coordinates."""
    k, p = sh.kind, sh.params
    if k in ("circle", "ellipse"):
        return u * u + v * v <= 1.0
    if k == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= p[0] ** 2)
    if k == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if k == "diamond":  # rhombus, narrower along u
        return np.abs(u) / p[0] + np.abs(v) <= 1.0
    if k in ("triangle", "pentagon", "hexagon", "star"):
        return _star_inside(u, v, int(p[0]), p[1])
    if k == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= p[0]) & (av <= 1.0)) | ((av <= p[0]) & (au <= 1.0))
    if k == "arrow":  # shaft from u=-1 to the head, head a triangle from u=h0 to the tip at u=1
        t, h0, hw = p
        shaft = (u >= -1.0) & (u <= h0) & (np.abs(v) <= t)
        head = (u >= h0) & (np.abs(v) <= hw * (1.0 - u) / (1.0 - h0))
        return shaft | head
    if k == "crescent":
        d, rc = p
        return (u * u + v * v <= 1.0) & ((u - d) ** 2 + v * v > rc * rc)
    if k == "blob":  # irregular radius: 0.75 * (1 + sum a_k cos(k phi + p_k)), k = 2, 3, ...
        amps, phases = p
        phi = np.arctan2(v, u)
        r = np.ones_like(phi)
        for j, (a, ph) in enumerate(zip(amps, phases)):
            r += a * np.cos((j + 2) * phi + ph)
        return u * u + v * v <= (0.75 * r) ** 2
    if k == "line":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= p[0])
    raise ValueError(f"unknown shape kind {k!r}")


def _object_params(kind: str, rng: np.random.Generator) -> tuple[float, float, tuple]:
    """(rotation radians, stretch, params) for an object class. Rotations of squares, diamonds
    and crosses stay near axis-aligned so that square / diamond / cross remain distinct."""
    rot = rng.uniform(0.0, 2.0 * math.pi)
    near_axis = math.radians(rng.uniform(-20.0, 20.0))
    if kind in ("circle", "ring"):
        return rot, rng.uniform(0.93, 1.07), (rng.uniform(0.5, 0.65),)
    if kind == "ellipse":
        return rot, rng.uniform(0.42, 0.65), ()
    if kind == "square":
        return near_axis, rng.uniform(0.9, 1.1), ()
    if kind == "diamond":
        return near_axis, rng.uniform(0.95, 1.1), (rng.uniform(0.55, 0.72),)
    if kind == "cross":
        return near_axis, rng.uniform(0.85, 1.15), (rng.uniform(0.28, 0.4),)
    if kind in ("triangle", "pentagon", "hexagon"):
        n = {"triangle": 3, "pentagon": 5, "hexagon": 6}[kind]
        return rot, rng.uniform(0.88, 1.12), (n, math.cos(math.pi / n))
    if kind == "star":
        return rot, rng.uniform(0.9, 1.1), (5, rng.uniform(0.38, 0.5))
    if kind == "arrow":
        return rot, rng.uniform(0.9, 1.1), (rng.uniform(0.16, 0.26), rng.uniform(0.0, 0.25), rng.uniform(0.5, 0.7))
    if kind == "crescent":
        return rot, rng.uniform(0.9, 1.1), (rng.uniform(0.35, 0.55), rng.uniform(0.75, 0.9))
    raise ValueError(f"unknown class {kind!r}")


@dataclass
class _Layout:
    """Everything about one image except the pixel noise. ``layers`` are in paint order."""

    size: int
    bg: dict
    layers: list[_Shape]


def _bg_colour_at(bg: dict, x: float, y: float, size: int) -> np.ndarray:
    t = (x * math.cos(bg["angle"]) + y * math.sin(bg["angle"])) / (size * math.sqrt(2.0)) + 0.5
    return bg["c0"] + np.clip(t, 0.0, 1.0) * (bg["c1"] - bg["c0"])


def _sample_layout(rng: np.random.Generator, size: int, num_classes: int, min_objects: int, max_objects: int) -> _Layout:
    """Draw one image's layout. The draw order is fixed, so the same generator state always
    gives the same layout."""
    bg = {
        "c0": _random_colour(rng), "c1": _random_colour(rng), "angle": rng.uniform(0.0, 2.0 * math.pi),
        "pattern": int(rng.integers(0, 3)),  # 0 none, 1 stripes, 2 checker
        "p_angle": rng.uniform(0.0, math.pi), "p_period": rng.uniform(4.0, 24.0),
        "p_colour": rng.uniform(-1.0, 1.0, 3).astype(np.float32) * rng.uniform(8.0, 35.0),
        "noise": rng.uniform(2.0, 14.0),  # std of the pixel noise, 0..255 scale
    }

    def shape(kind: str, label: int, s: float, rot: float, stretch: float, params: tuple, colour: np.ndarray) -> _Shape:
        m = 0.3 * s  # centre at least 0.3 size from the border: at most ~20% of the width leaves the image
        cx = rng.uniform(m, size - m) if size > 2 * m else size / 2
        cy = rng.uniform(m, size - m) if size > 2 * m else size / 2
        colour2 = np.clip(colour + rng.uniform(-60.0, 60.0, 3), 0.0, 255.0).astype(np.float32)
        return _Shape(kind, label, float(cx), float(cy), float(s), rot, stretch, params, colour, colour2,
                      int(rng.integers(0, 3)), rng.uniform(0.0, 2.0 * math.pi), rng.uniform(2.5, 8.0))

    def clutter(kind: str) -> _Shape:
        if kind == "blob":
            s = math.exp(rng.uniform(math.log(6.0), math.log(max(7.0, 0.25 * size))))
            amps = rng.uniform(0.12, 0.22, 3)
            return shape("blob", -1, s, 0.0, 1.0, (tuple(amps), tuple(rng.uniform(0, 2 * math.pi, 3))), _random_colour(rng))
        s = rng.uniform(10.0, 0.7 * size)
        thick = rng.uniform(0.6, 2.0)  # half thickness, pixels
        return shape("line", -1, s, rng.uniform(0, 2 * math.pi), 1.0, (2.0 * thick / s,), _random_colour(rng))

    layers = [clutter("blob" if rng.random() < 0.5 else "line") for _ in range(int(rng.integers(0, 7)))]

    lo, hi = math.log(min(MIN_OBJECT_PX, size * MAX_OBJECT_FRAC)), math.log(size * MAX_OBJECT_FRAC)
    objects = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        label = int(rng.integers(0, num_classes))
        s = math.exp(rng.uniform(lo, hi))
        rot, stretch, params = _object_params(SHAPE_CLASSES[label], rng)
        sh = shape(SHAPE_CLASSES[label], label, s, rot, stretch, params, _random_colour(rng))
        if objects and rng.random() < CLUSTER_P:  # crowd: move next to an earlier object
            a = objects[int(rng.integers(0, len(objects)))]
            d, ang = rng.uniform(0.3, 0.8) * 0.5 * (a.size + s), rng.uniform(0.0, 2.0 * math.pi)
            m = min(0.3 * s, size / 2)
            sh.cx = float(np.clip(a.cx + d * math.cos(ang), m, size - m))
            sh.cy = float(np.clip(a.cy + d * math.sin(ang), m, size - m))
        # Colour is random, but keep it visibly different from the background under the object.
        bgc = _bg_colour_at(bg, sh.cx - size / 2, sh.cy - size / 2, size)
        for _ in range(4):
            if np.linalg.norm(sh.colour - bgc) >= 70.0:
                break
            sh.colour = _random_colour(rng)
            sh.colour2 = np.clip(sh.colour + rng.uniform(-60.0, 60.0, 3), 0.0, 255.0).astype(np.float32)
        objects.append(sh)
    # Mostly big-under-small, as in real scenes, with enough noise that big objects also occlude.
    keys = [-math.log(o.size) + rng.normal(0.0, 0.8) for o in objects]
    layers += [objects[j] for j in np.argsort(keys, kind="stable")]
    layers += [clutter("line") for _ in range(int(rng.integers(0, 3)))]
    return _Layout(size, bg, layers)


def _paint_background(layout: _Layout) -> np.ndarray:
    """Gradient + optional stripes / checker, float32 ``[3, H, W]`` on 0..255. (Channels first:
    numpy broadcasting over a trailing axis of 3 is several times slower.)"""
    n, bg = layout.size, layout.bg
    xs = np.arange(n, dtype=np.float32) + np.float32(0.5 - n / 2)
    k = 1.0 / (n * math.sqrt(2.0))
    t = xs[None, :] * np.float32(math.cos(bg["angle"]) * k) + (xs[:, None] * np.float32(math.sin(bg["angle"]) * k) + np.float32(0.5))
    img = t[None] * (bg["c1"] - bg["c0"])[:, None, None]
    img += bg["c0"][:, None, None]
    if bg["pattern"] == 1:  # stripes: sign of a square wave along p_angle
        f = np.float32(0.5 / bg["p_period"])
        r = xs[None, :] * (f * np.float32(math.cos(bg["p_angle"]))) + xs[:, None] * (f * np.float32(math.sin(bg["p_angle"])))
        r -= np.floor(r)
        img += np.where(r < 0.5, np.float32(1.0), np.float32(-1.0))[None] * bg["p_colour"][:, None, None]
    elif bg["pattern"] == 2:  # axis-aligned checker
        q = np.floor(xs / np.float32(bg["p_period"])).astype(np.int32)
        odd = ((q[None, :] + q[:, None]) & 1).astype(bool)
        img += np.where(odd, np.float32(1.0), np.float32(-1.0))[None] * bg["p_colour"][:, None, None]
    return img


def _composite(layout: _Layout, img: np.ndarray | None) -> tuple[np.ndarray, list[float]]:
    """Paint the layers in order. Returns the owner map int16 ``[H, W]`` (index of the layer
    that shows at each pixel, -1 for background) and each layer's full silhouette area in pixels
    (including any part outside the image). Paints colours into ``img [3, H, W]`` when given."""
    n = layout.size
    owner = np.full((n, n), -1, np.int16)
    areas = []
    for k, sh in enumerate(layout.layers):
        x0, y0, x1, y1 = sh.window()
        dx, dy, u, v = _local_coords(sh, x0, y0, x1, y1)
        mask = _shape_mask(sh, u, v)
        areas.append(float(mask.sum()))
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, n), min(y1, n)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        crop = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        m = mask[crop]
        owner[cy0:cy1, cx0:cx1][m] = k
        if img is None:
            continue
        if sh.texture == 0:
            tex = sh.colour[:, None, None]
        else:
            proj = (dx * math.cos(sh.tex_angle) + dy * math.sin(sh.tex_angle))[crop]
            if sh.texture == 1:
                t = np.clip(proj / max(sh.size, 1.0) + 0.5, 0.0, 1.0)
            else:
                t = np.floor(proj / sh.tex_period) % 2.0
            tex = sh.colour[:, None, None] + t[None] * (sh.colour2 - sh.colour)[:, None, None]
        np.copyto(img[:, cy0:cy1, cx0:cx1], tex, where=m[None])
    return owner, areas


def _annotate(layout: _Layout, owner: np.ndarray, areas: list[float]) -> list[tuple[int, str, int, list[int]]]:
    """For each object layer ``k`` (paint order): ``(k, status, visible_px, box)``. ``status`` is
    ``"box"`` (at least MIN_VISIBLE of its area shows), ``"ignore"`` (less, but at least
    MIN_IGNORE_PX pixels) or ``"dropped"``; ``box`` is the tight xyxy box of the visible pixels
    (x2 = last column + 1), empty when nothing shows."""
    n, out = layout.size, []
    for k, sh in enumerate(layout.layers):
        if sh.label < 0:
            continue
        x0, y0, x1, y1 = sh.window()
        cx0, cy0 = max(x0, 0), max(y0, 0)
        vis = owner[cy0:max(min(y1, n), cy0), cx0:max(min(x1, n), cx0)] == k
        shown, box = int(vis.sum()), []
        if shown:
            rows, cols = np.flatnonzero(vis.any(axis=1)), np.flatnonzero(vis.any(axis=0))
            box = [cx0 + int(cols[0]), cy0 + int(rows[0]), cx0 + int(cols[-1]) + 1, cy0 + int(rows[-1]) + 1]
        status = "box" if shown and shown >= MIN_VISIBLE * areas[k] else "ignore" if shown >= MIN_IGNORE_PX else "dropped"
        out.append((k, status, shown, box))
    return out


class ShapesDataset(DetectionDataset):
    """Procedural shapes detection dataset, deterministic by ``seed``.

    ``num_images`` square RGB images of ``image_size`` pixels, each with ``min_objects`` to
    ``max_objects`` drawn objects of ``num_classes`` classes (the first ``num_classes`` names of
    :data:`SHAPE_CLASSES`). Records: ``image_id = i``, ``file_name = f"{i:06d}.png"``, no path.
    Images are uint8 ``[3, image_size, image_size]`` rendered on the fly by :meth:`load_image`.
    """

    format = "shapes"

    def __init__(
        self,
        num_images: int = 256,
        image_size: int = 256,
        num_classes: int = 10,
        seed: int = 0,
        *,
        min_objects: int = 2,
        max_objects: int = 10,
        transforms=None,
    ):
        if not 1 <= num_classes <= len(SHAPE_CLASSES):
            raise KdctlError(f"shapes: num_classes must be between 1 and {len(SHAPE_CLASSES)}, got {num_classes}")
        if image_size < 16:
            raise KdctlError(f"shapes: image_size must be at least 16 pixels, got {image_size}")
        if not 0 <= min_objects <= max_objects:
            raise KdctlError(f"shapes: need 0 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
        if num_images < 0 or seed < 0:
            raise KdctlError(f"shapes: num_images and seed must be non-negative, got {num_images} and {seed}")
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self._num_classes = int(num_classes)
        report = LoadReport()
        records = []
        for i in range(self.num_images):
            layout = self._layout(i)[0]
            objs = _annotate(layout, *_composite(layout, None))
            parts = {}
            for status in ("box", "ignore"):
                sel = [(layout.layers[k].label, box) for k, st, _, box in objs if st == status]
                b, keep = sanitize_boxes(np.array([x[1] for x in sel], np.float32), image_size, image_size, report)
                parts[status] = (b, np.array([x[0] for x in sel], np.int64).reshape(-1)[keep])
            records.append(ImageRecord(
                image_id=i, file_name=f"{i:06d}.png", width=image_size, height=image_size, boxes=parts["box"][0],
                labels=parts["box"][1], ignore=parts["ignore"][0], ignore_labels=parts["ignore"][1], path=None,
            ))
        source = f"shapes(num_images={num_images}, image_size={image_size}, num_classes={num_classes}, seed={seed})"
        super().__init__(records, list(SHAPE_CLASSES[:num_classes]), report=report, source=source, transforms=transforms)

    def _layout(self, i: int) -> tuple[_Layout, np.random.Generator]:
        """Layout of image ``i`` and the generator, positioned to draw that image's noise."""
        rng = np.random.default_rng([self.seed, int(i)])
        layout = _sample_layout(rng, self.image_size, self._num_classes, self.min_objects, self.max_objects)
        return layout, rng

    def render(self, i: int, return_masks: bool = False):
        """Render image ``i``: uint8 ``[3, H, W]``. With ``return_masks``, also a bool
        ``[N, H, W]`` mask of the visible pixels of each labelled object, in the order of
        ``records[i].boxes`` (each box is the tight box of its mask)."""
        layout, rng = self._layout(i)
        img = _paint_background(layout)
        owner, areas = _composite(layout, img)
        # Zero-mean uniform noise with standard deviation bg["noise"] (cheaper than Gaussian).
        noise = rng.random(img.shape, dtype=np.float32) - np.float32(0.5)
        img += noise * np.float32(layout.bg["noise"] * math.sqrt(12.0))
        np.clip(img, 0.0, 255.0, out=img)
        out = torch.from_numpy(img.astype(np.uint8))
        if not return_masks:
            return out
        kept = [k for k, status, _, _ in _annotate(layout, owner, areas) if status == "box"]
        masks = owner[None] == np.asarray(kept, np.int16).reshape(-1, 1, 1)
        return out, torch.from_numpy(masks)

    def debug_objects(self, i: int) -> dict[str, np.ndarray]:
        """Every object drawn in image ``i`` (paint order), for tests and inspection:
        ``labels [K]`` int64, ``full_area [K]`` and ``visible_area [K]`` (pixels; the full
        silhouette counts its part outside the image) and ``status [K]``: ``"box"``,
        ``"ignore"`` or ``"dropped"``."""
        layout = self._layout(i)[0]
        owner, areas = _composite(layout, None)
        objs = _annotate(layout, owner, areas)
        return {
            "labels": np.array([layout.layers[k].label for k, *_ in objs], np.int64),
            "full_area": np.array([areas[k] for k, *_ in objs], np.float64),
            "visible_area": np.array([shown for _, _, shown, _ in objs], np.float64),
            "status": np.array([status for _, status, _, _ in objs], dtype=str),
        }

    def load_image(self, rec: ImageRecord) -> torch.Tensor:
        """uint8 ``[3, H, W]`` for one record, rendered from its per-image seed."""
        return self.render(rec.image_id)
