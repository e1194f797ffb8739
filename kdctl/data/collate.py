"""Batching transformed samples into padded tensors.

Use as a DataLoader ``collate_fn`` with ``functools.partial(collate, pad_divisor=32)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """A padded batch. B images, G = max boxes per image (>= 1), M = max ignore regions (>= 1).

    images         float32 [B, 3, H, W]  zero-padded bottom/right; H, W multiples of pad_divisor
    valid_sizes    int64   [B, 2]  (h, w) of each image after resize, before padding
    boxes          float32 [B, G, 4]  xyxy pixels in the resized frame, zeros at padding
    labels         int64   [B, G]  class index, -1 at padding
    gt_mask        bool    [B, G]  True for real boxes
    ignore         float32 [B, M, 4]  ignore regions, xyxy pixels in the resized frame
    ignore_labels  int64   [B, M]  -1 at padding
    ignore_mask    bool    [B, M]
    image_ids      int64   [B]
    orig_sizes     int64   [B, 2]  (h, w) of the original image
    scales         float32 [B, 2]  (resized / original) for y and x; original = resized / scale
    pad_sizes      int64   [B, 2]  each image's own extent: valid_sizes rounded up to pad_divisor
                                   (mmdet's per-image ``pad_shape``; the priors' valid flags)
    unreadable     tuple of (file, reason, image_id): images that failed to decode with
                   ``data.skip_bad`` (left out of the batch; B may then be 0). image_id is None
                   for one a training sample replaced (:class:`kdctl.engine.loader.SeededDataset`)
    """

    images: torch.Tensor
    valid_sizes: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    gt_mask: torch.Tensor
    ignore: torch.Tensor
    ignore_labels: torch.Tensor
    ignore_mask: torch.Tensor
    image_ids: torch.Tensor
    orig_sizes: torch.Tensor
    scales: torch.Tensor
    pad_sizes: torch.Tensor
    unreadable: tuple = ()

    def _apply(self, fn) -> "Batch":
        return Batch(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A copy with every tensor in pinned host memory (called by DataLoader(pin_memory=True))."""
        return self._apply(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return int(self.images.shape[0])


def pad_ragged(tensors: list[torch.Tensor], pad_value, min_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``B`` tensors ``[n_b, *tail]`` into ``[B, L, *tail]`` with ``L = max(min_len, max n_b)``,
    filling the rest with ``pad_value``. Returns ``(padded, mask [B, L] bool)``; one scatter, no
    per-element loop."""
    lens = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
    length = max(min_len, int(lens.max()) if len(tensors) else 0)
    flat = torch.cat(tensors) if tensors else torch.zeros(0)
    mask = torch.arange(length)[None, :] < lens[:, None]
    out = torch.full((len(tensors), length, *flat.shape[1:]), pad_value, dtype=flat.dtype)
    out[mask] = flat
    return out, mask


def _plain(t) -> torch.Tensor:
    """Strip tv_tensor subclasses so the batch holds plain tensors."""
    return torch.as_tensor(t).as_subclass(torch.Tensor)


def collate(samples: list[dict], pad_divisor: int = 32) -> Batch:
    """Pad and stack transformed samples (see :mod:`kdctl.data.dataset` for the sample dict).

    Images are zero-padded at the bottom/right to the batch max size rounded up to
    ``pad_divisor``. Images are cast to float32 as they are; normalising is the transforms' job.
    """
    if not samples:
        raise ValueError("collate() needs at least one sample")
    unreadable = tuple((f, r, s.get("image_id") if "image" not in s else None)
                       for s in samples for f, r in s.get("unreadable", ()))
    samples = [s for s in samples if "image" in s]
    if not samples:
        return _empty(unreadable)
    images = [_plain(s["image"]) for s in samples]
    valid = torch.tensor([[int(im.shape[-2]), int(im.shape[-1])] for im in images], dtype=torch.long)
    d = max(1, int(pad_divisor))
    hmax, wmax = (int(v) for v in valid.max(dim=0).values)
    H, W = math.ceil(hmax / d) * d, math.ceil(wmax / d) * d
    # Allocate without zero-filling and zero only the padding strips: one pass over memory.
    batch_images = torch.empty((len(images), 3, H, W), dtype=torch.float32)
    for b, im in enumerate(images):
        h, w = im.shape[-2:]
        batch_images[b, :, :h, :w] = im
        batch_images[b, :, h:, :] = 0
        batch_images[b, :, :h, w:] = 0
    boxes, gt_mask = pad_ragged([_plain(s["boxes"]).float().reshape(-1, 4) for s in samples], 0.0)
    labels, _ = pad_ragged([_plain(s["labels"]).long().reshape(-1) for s in samples], -1)
    ignore, ignore_mask = pad_ragged([_plain(s["ignore"]).float().reshape(-1, 4) for s in samples], 0.0)
    ignore_labels, _ = pad_ragged([_plain(s["ignore_labels"]).long().reshape(-1) for s in samples], -1)
    orig = torch.tensor([[int(x) for x in s["orig_size"]] for s in samples], dtype=torch.long)
    return Batch(
        images=batch_images,
        valid_sizes=valid,
        boxes=boxes,
        labels=labels,
        gt_mask=gt_mask,
        ignore=ignore,
        ignore_labels=ignore_labels,
        ignore_mask=ignore_mask,
        image_ids=torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.long),
        orig_sizes=orig,
        scales=(valid.float() / orig.float()).float(),
        pad_sizes=torch.div(valid + d - 1, d, rounding_mode="floor") * d,
        unreadable=unreadable,
    )


def _empty(unreadable: tuple) -> Batch:
    """A batch of no image: every image of it was unreadable (``data.skip_bad``)."""
    def z(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype)

    return Batch(images=z(0, 3, 0, 0), valid_sizes=z(0, 2, dtype=torch.long), boxes=z(0, 1, 4),
                 labels=z(0, 1, dtype=torch.long), gt_mask=z(0, 1, dtype=torch.bool), ignore=z(0, 1, 4),
                 ignore_labels=z(0, 1, dtype=torch.long), ignore_mask=z(0, 1, dtype=torch.bool),
                 image_ids=z(0, dtype=torch.long), orig_sizes=z(0, 2, dtype=torch.long), scales=z(0, 2),
                 pad_sizes=z(0, 2, dtype=torch.long), unreadable=unreadable)


@dataclass
class ImageBatch:
    """Letterboxed uint8 images for inference (:class:`kdctl.data.images.ImageStream` samples).

    images       uint8   [B, 3, H, W]  all letterboxed to one (H, W); the model side normalises
    valid_sizes  int64   [B, 2]  (h', w') of each resized image inside the padding
    orig_sizes   int64   [B, 2]  (h, w) of each image as decoded
    scales       float32 [B, 2]  valid / orig for y and x: original pixels = input pixels / scale
    items        list[dict]      per image: ``name``, ``source``, ``frame``, ``original`` (uint8 [3, h, w])
    """

    images: torch.Tensor
    valid_sizes: torch.Tensor
    orig_sizes: torch.Tensor
    scales: torch.Tensor
    items: list[dict]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def collate_uint8(samples: list[dict]) -> ImageBatch:
    """Stack letterboxed samples (one shared size, so no padding here) into an :class:`ImageBatch`."""
    if not samples:
        raise ValueError("collate_uint8() needs at least one sample")
    valid = torch.tensor([list(s["valid_size"]) for s in samples], dtype=torch.long)
    orig = torch.tensor([list(s["orig_size"]) for s in samples], dtype=torch.long)
    return ImageBatch(
        images=torch.stack([s["image"] for s in samples]),
        valid_sizes=valid,
        orig_sizes=orig,
        scales=valid.float() / orig.float(),
        items=[{k: s[k] for k in ("name", "source", "frame", "original")} for s in samples],
    )
