"""The one record and sample format shared by every dataset, plus box sanitising and COCO export.

Every parser (COCO JSON, YOLO, VOC, shapes) produces a list of :class:`ImageRecord` at
construction; images are decoded lazily in ``__getitem__``. A sample is a dict that
``torchvision.transforms.v2`` understands::

    image      tv_tensors.Image  uint8 [3, H, W]
    boxes      tv_tensors.BoundingBoxes  float32 [N, 4], XYXY, pixels
    labels     int64 [N], contiguous class index in [0, K)
    ignore     tv_tensors.BoundingBoxes  float32 [M, 4]: crowd / difficult regions
    ignore_labels  int64 [M]
    image_id   int (the id written to and read from COCO JSON)
    orig_size  (H, W) of the image on disk, pixels
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors

from kdctl.errors import DataError

# Edges of the box-size histogram, in pixels of sqrt(area). COCO's small/medium/large split
# (32², 96²) is reported separately.
SIZE_BINS = (0, 8, 16, 32, 64, 128, 256, 512, math.inf)


@dataclass
class ImageRecord:
    """One image and its annotations, already sanitised (clipped, degenerate boxes dropped)."""

    image_id: int
    file_name: str  # as written in COCO export (relative to the image root)
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels
    labels: np.ndarray  # int64 [N] in [0, K)
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [M, 4]
    ignore_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # [M]
    path: Path | None = None  # file on disk; None for generated images


@dataclass
class LoadReport:
    """What a loader repaired or skipped. ``skipped`` holds (file, reason) pairs."""

    clipped: int = 0
    degenerate: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip_or_raise(self, exc: DataError, skip_bad: bool, file: str | None = None) -> None:
        """Raise ``exc``, or with ``skip_bad`` record the sample as skipped. ``file`` is the
        sample's file when the problem lies elsewhere (a bad annotation in a COCO JSON)."""
        if not skip_bad:
            raise exc
        if file is None or file == exc.path:
            where = f"line {exc.line}: " if exc.line is not None else ""
            self.skipped.append((exc.path, where + exc.problem))
        else:
            self.skipped.append((file, str(exc)))

    def to_dict(self) -> dict:
        return {
            "notes": list(self.notes),
            "boxes_clipped": self.clipped,
            "boxes_degenerate_dropped": self.degenerate,
            "samples_skipped": len(self.skipped),
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
        }


def sanitize_boxes(
    boxes: np.ndarray, width: int, height: int, report: LoadReport, min_size: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes ``[N, 4]`` (pixels) to the image and drop degenerate ones.

    A box is degenerate when it is not finite or, after clipping, narrower or shorter than
    ``min_size`` pixels. Returns ``(boxes [N', 4] float32, keep [N] bool)`` and counts clipped
    and dropped boxes in ``report``.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    safe = np.where(finite[:, None], boxes, 0.0)
    clipped = safe.copy()
    clipped[:, 0::2] = safe[:, 0::2].clip(0, width)
    clipped[:, 1::2] = safe[:, 1::2].clip(0, height)
    keep = finite & ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    changed = (np.abs(clipped - safe) > 1e-3).any(axis=1) & keep
    report.clipped += int(changed.sum())
    report.degenerate += int((~keep).sum())
    return clipped[keep], keep


def stem_image_ids(paths: list[Path]) -> list[int]:
    """Image ids for formats without ids of their own (YOLO, VOC): ``int(stem)`` for each path
    when all stems are unique non-negative integers, else the index of each path in
    ``sorted(paths)``."""
    stems = [p.stem for p in paths]
    if stems and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    order = {p: i for i, p in enumerate(sorted(paths))}
    return [order[p] for p in paths]


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels. Raises DataError."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(path, "image file not found; check the path or set data.skip_bad: true to skip it")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(path, f"cannot read image ({exc.__class__.__name__}); replace the file or set data.skip_bad: true") from None


def decode_image(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 ``[3, H, W]`` RGB (EXIF orientation not applied, as in
    COCO tooling). Raises DataError naming the file.

    Two copies in all (PIL buffer -> array -> contiguous CHW); a channels-last view measured
    slower through resize + normalise + collate (benchmarks/bench_data.py)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            array = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(path, f"cannot decode image ({(str(exc).splitlines() or [type(exc).__name__])[0][:120]}); replace the file or set data.skip_bad: true") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DetectionDataset(torch.utils.data.Dataset):
    """A list of :class:`ImageRecord` with lazy image decoding and optional v2 transforms.

    Subclasses fill ``records``, ``classes`` (names, index = label) and ``cat_ids`` (the COCO
    category id of each label; ``cat_ids[label]``) and may override :meth:`load_image`.
    """

    format: str = "base"

    def __init__(
        self,
        records: list[ImageRecord],
        classes: list[str],
        cat_ids: list[int] | None = None,
        report: LoadReport | None = None,
        source: str = "",
        transforms=None,
        skip_bad: bool = False,
    ):
        self.records = records
        self.classes = list(classes)
        # Non-COCO formats use category id = label + 1 (COCO reserves nothing, but 0 is
        # background in many tools); COCO JSON keeps its own ids.
        self.cat_ids = list(cat_ids) if cat_ids is not None else list(range(1, len(classes) + 1))
        self.label_of_cat = {c: i for i, c in enumerate(self.cat_ids)}
        self.report = report or LoadReport()
        self.source = source
        self.transforms = transforms
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, rec: ImageRecord) -> torch.Tensor:
        """uint8 ``[3, H, W]`` for one record."""
        assert rec.path is not None
        return decode_image(rec.path)

    def __getitem__(self, idx: int) -> dict:
        try:
            sample = self.load_sample(idx)
        except DataError as exc:
            return self.unreadable(idx, exc)
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def unreadable(self, idx: int, exc: DataError) -> dict:
        """With ``skip_bad``, the sample standing for image ``idx`` that failed to decode
        (``exc``): ``{"unreadable": [(file, reason)], "image_id": id}``, which the collate leaves
        out of its batch and reports (:attr:`kdctl.data.collate.Batch.unreadable`), so every
        command skips such an image alike and counts it. Without ``skip_bad``, ``exc`` is raised.

        The header of every image is read when the dataset is built (a file that does not open
        is skipped there); this is the rule for one whose pixels fail later (a truncated JPEG)."""
        if not self.skip_bad:
            raise exc
        return {"unreadable": [(str(exc.path), exc.problem.split(";")[0])], "image_id": self.records[idx].image_id}

    def load_sample(self, idx: int) -> dict:
        """The sample of ``idx`` as decoded, before ``transforms`` (what
        :class:`kdctl.data.augment.AugmentedDataset` composes its mosaics from)."""
        rec = self.records[idx]
        img = self.load_image(rec)
        h, w = int(img.shape[-2]), int(img.shape[-1])
        if (h, w) != (rec.height, rec.width):
            raise DataError(rec.path or rec.file_name, f"image is {w}x{h} but annotations say {rec.width}x{rec.height}")
        sample = {
            "image": tv_tensors.Image(img),
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(rec.boxes).float().reshape(-1, 4), format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(rec.labels).long().reshape(-1),
            "ignore": tv_tensors.BoundingBoxes(torch.from_numpy(rec.ignore).float().reshape(-1, 4), format="XYXY", canvas_size=(h, w)),
            "ignore_labels": torch.from_numpy(rec.ignore_labels).long().reshape(-1),
            "image_id": rec.image_id,
            "orig_size": (h, w),
        }
        return sample

    # ------------------------------------------------------------------ COCO export / stats
    def to_coco(self) -> dict:
        """Ground truth as a COCO JSON dict. Ignore regions are written with ``iscrowd: 1`` so
        that COCOeval neither rewards nor penalises detections on them."""
        images, anns = [], []
        for rec in self.records:
            images.append({"id": rec.image_id, "file_name": rec.file_name, "width": rec.width, "height": rec.height})
            for boxes, labels, crowd in ((rec.boxes, rec.labels, 0), (rec.ignore, rec.ignore_labels, 1)):
                for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
                    anns.append({
                        "id": len(anns) + 1, "image_id": rec.image_id, "category_id": self.cat_ids[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd,
                    })
        cats = [{"id": c, "name": n, "supercategory": "none"} for c, n in zip(self.cat_ids, self.classes)]
        return {"images": images, "annotations": anns, "categories": cats}

    def stats(self) -> dict:
        """Images, boxes, per-class counts, a box-size histogram (sqrt(area) in pixels) and
        what loading repaired or skipped."""
        boxes = np.concatenate([r.boxes for r in self.records]) if self.records else np.zeros((0, 4), np.float32)
        labels = np.concatenate([r.labels for r in self.records]) if self.records else np.zeros((0,), np.int64)
        side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        hist, _ = np.histogram(side, bins=np.array(SIZE_BINS, dtype=np.float64))
        area = side**2
        per_class = np.bincount(labels, minlength=len(self.classes)) if len(self.classes) else np.zeros(0, np.int64)
        bins = [f"{int(a)}-{int(b)}" if math.isfinite(b) else f"{int(a)}+" for a, b in zip(SIZE_BINS[:-1], SIZE_BINS[1:])]
        return {
            "source": self.source,
            "format": self.format,
            "images": len(self.records),
            "images_without_boxes": int(sum(len(r.boxes) == 0 for r in self.records)),
            "boxes": int(len(boxes)),
            "ignore_regions": int(sum(len(r.ignore) for r in self.records)),
            "classes": len(self.classes),
            "per_class": {name: int(n) for name, n in zip(self.classes, per_class.tolist())},
            "size_histogram": dict(zip(bins, hist.tolist())),
            "coco_sizes": {
                "small": int((area < 32**2).sum()),
                "medium": int(((area >= 32**2) & (area < 96**2)).sum()),
                "large": int((area >= 96**2).sum()),
            },
            "repairs": self.report.to_dict(),
        }
