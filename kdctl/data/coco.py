"""COCO JSON ground truth (``instances_*.json``) as a :class:`DetectionDataset`.

Conventions
-----------
* ``bbox`` is ``[x, y, w, h]`` in pixels (top-left corner, float); it is converted to
  ``[x1, y1, x2, y2]`` and then clipped / filtered by :func:`sanitize_boxes`.
* Category ids may be non-contiguous (COCO uses 1..90 with gaps). Labels are the positions
  of the ids in sorted order: ``cat_ids[label] == category_id`` and
  ``label_of_cat[category_id] == label``; ``classes[label]`` is the category name.
* ``iscrowd: 1`` (and the ``ignore: 1`` flag some tools write) turns an annotation into an
  ignore region (``ignore`` / ``ignore_labels``) instead of a box.
* Images without annotations are kept (they are negatives for training and count in eval).
* ``image_id`` is the JSON's image id (an int, or a string of digits converted to int).
"""
from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path

import numpy as np

from kdctl.data.dataset import DetectionDataset, ImageRecord, LoadReport, read_image_size, sanitize_boxes
from kdctl.errors import DataError, os_problem

_REQUIRED_KEYS = ("images", "annotations", "categories")


def _load_json(path: Path) -> dict:
    """Parse the file; any failure here is fatal, even with ``skip_bad``."""
    if not path.is_file():
        raise DataError(path, "COCO annotation file not found; check data.ann_file")
    try:
        with path.open("r", encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON ({exc.msg}, column {exc.colno}); fix or re-export the file", line=exc.lineno) from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"is not UTF-8 text (byte at offset {exc.start}); save it as UTF-8") from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply to read; fix or re-export the file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read file: {os_problem(exc)}") from None
    if not isinstance(data, dict):
        raise DataError(path, f"top level is a JSON {type(data).__name__}, expected an object with keys {list(_REQUIRED_KEYS)}")
    missing = [k for k in _REQUIRED_KEYS if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(path, f"missing or non-list top-level key(s) {missing}; a COCO detection file needs {list(_REQUIRED_KEYS)}")
    return data


def _as_id(value) -> int | None:
    """An integer id (``int`` or a string of digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


class CocoDataset(DetectionDataset):
    """Detection ground truth from one COCO JSON file.

    Args:
        ann_file: the ``instances_*.json`` file.
        image_root: folder that ``file_name`` is relative to; defaults to the JSON's folder.
        skip_bad: skip images with a bad entry, a bad annotation or an unreadable file and
            record ``(file, reason)`` in ``report.skipped`` instead of raising. A file that is
            not valid JSON, or lacks ``images`` / ``annotations`` / ``categories``, always fails.
        check_images: open every image header to verify it exists, is readable and matches
            the JSON's ``width`` / ``height``. Turn off for evaluation-only GT with no images.
            ``"auto"``: check when any listed image exists under ``image_root``; when none
            does, treat the file as annotations only and say so in ``report.notes``.
        min_box_size: boxes narrower or shorter than this (pixels, after clipping) are dropped.
        transforms: optional ``torchvision.transforms.v2`` callable applied to each sample.
    """

    format = "coco"

    def __init__(self, ann_file, image_root=None, *, skip_bad: bool = False, check_images: bool | str = True,
                 min_box_size: float = 1.0, transforms=None):
        ann_file = Path(ann_file)
        self.ann_file = ann_file
        self.image_root = Path(image_root) if image_root is not None else ann_file.parent
        self.skip_bad = skip_bad
        report = LoadReport()
        data = _load_json(ann_file)

        cat_ids, classes = self._parse_categories(data["categories"])
        label_of_cat = {c: i for i, c in enumerate(cat_ids)}
        images, bad = self._parse_images(data["images"], report)
        per_image = self._parse_annotations(data["annotations"], images, label_of_cat, bad, report)

        if check_images == "auto":
            check_images = any((self.image_root / name).exists() for name, _, _ in images.values())
            if not check_images and images:
                report.notes.append(f"no image files found under {self.image_root}: annotations only")
        records = []
        for img_id, (file_name, width, height) in images.items():
            if img_id in bad:
                continue
            path = self.image_root / file_name
            if check_images:
                try:
                    width, height = self._checked_size(path, width, height)
                except DataError as exc:
                    self._fail(exc, report, str(path))
                    continue
            elif width <= 0 or height <= 0:
                # Without the image we cannot recover the size; boxes cannot be clipped.
                self._fail(DataError(ann_file, f"image id {img_id} ({file_name}) has no positive width/height; "
                                               "add them or enable image checks"), report, str(path))
                continue
            boxes, labels, crowd = per_image.get(img_id, ([], [], []))
            xywh = np.asarray(boxes, np.float64).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            labels = np.asarray(labels, np.int64)
            crowd = np.asarray(crowd, bool)
            kept_boxes, keep = sanitize_boxes(xyxy[~crowd], width, height, report, min_box_size)
            kept_ign, keep_ign = sanitize_boxes(xyxy[crowd], width, height, report, min_box_size)
            records.append(ImageRecord(
                image_id=img_id, file_name=file_name, width=width, height=height,
                boxes=kept_boxes, labels=labels[~crowd][keep],
                ignore=kept_ign, ignore_labels=labels[crowd][keep_ign], path=path,
            ))
        super().__init__(records, classes, cat_ids, report, source=str(ann_file), transforms=transforms, skip_bad=skip_bad)

    # ------------------------------------------------------------------ parsing helpers
    def _fail(self, exc: DataError, report: LoadReport, file: str) -> None:
        """Raise ``exc`` or, with ``skip_bad``, record ``file`` as a skipped sample."""
        report.skip_or_raise(exc, self.skip_bad, file)

    def _parse_categories(self, cats: list) -> tuple[list[int], list[str]]:
        """Sorted category ids and their names. A bad category always fails."""
        by_id: dict[int, str] = {}
        for i, cat in enumerate(cats):
            cid = _as_id(cat.get("id")) if isinstance(cat, dict) else None
            if cid is None or not isinstance(cat.get("name"), str):
                raise DataError(self.ann_file, f"categories[{i}] needs an integer 'id' and a string 'name'; got {cat!r:.80}")
            if cid in by_id:
                raise DataError(self.ann_file, f"category id {cid} appears twice ({by_id[cid]!r}, {cat['name']!r}); ids must be unique")
            by_id[cid] = cat["name"]
        ids = sorted(by_id)
        return ids, [by_id[c] for c in ids]

    def _parse_images(self, entries: list, report: LoadReport) -> tuple[dict, set]:
        """``{image_id: (file_name, width, height)}`` in JSON order, plus ids already skipped."""
        images: dict[int, tuple[str, int, int]] = {}
        bad: set[int] = set()
        for i, im in enumerate(entries):
            where = f"images[{i}]"
            im = im if isinstance(im, dict) else {}
            img_id, name = _as_id(im.get("id")), im.get("file_name")
            w, h = im.get("width", 0), im.get("height", 0)
            problem = None
            if img_id is None:
                problem = f"{where} has no integer 'id'"
            elif img_id in images:
                problem = f"{where}: image id {img_id} appears twice; ids must be unique"
            elif not isinstance(name, str) or not name:
                problem = f"{where} (id {img_id}) has no 'file_name'"
            elif not (_is_number(w) and _is_number(h)):
                problem = f"{where} (id {img_id}) has non-numeric width/height {w!r}x{h!r}"
            if problem:
                self._fail(DataError(self.ann_file, problem + "; fix the image entry or set data.skip_bad: true"),
                           report, f"{self.ann_file}#{where}")
                if img_id is not None and img_id not in images:
                    bad.add(img_id)  # its annotations are dropped silently with the image
                continue
            images[img_id] = (name, int(w), int(h))
        return images, bad

    def _parse_annotations(self, anns: list, images: dict, label_of_cat: dict, bad: set,
                           report: LoadReport) -> dict:
        """``{image_id: (bboxes xywh, labels, crowd flags)}``; images with a bad annotation go in ``bad``."""
        per_image: dict[int, tuple[list, list, list]] = {}
        for i, ann in enumerate(anns):
            ann = ann if isinstance(ann, dict) else {}
            aid = ann.get("id", "?")
            where = f"annotation id {aid} (annotations[{i}])"
            img_id, cid, bbox = _as_id(ann.get("image_id")), _as_id(ann.get("category_id")), ann.get("bbox")
            if img_id in bad:
                continue  # the image is already skipped and reported
            problem = None
            if img_id is None or img_id not in images:
                problem = f"{where}: image_id {ann.get('image_id')!r} is not in 'images'"
            elif cid is None or cid not in label_of_cat:
                problem = f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'"
            elif not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                problem = f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r:.80}"
            if problem:
                exc = DataError(self.ann_file, problem + "; fix the annotation or set data.skip_bad: true")
                if img_id in images:
                    self._fail(exc, report, str(self.image_root / images[img_id][0]))
                    bad.add(img_id)
                else:
                    self._fail(exc, report, f"{self.ann_file}#annotations[{i}]")
                continue
            boxes, labels, crowd = per_image.setdefault(img_id, ([], [], []))
            boxes.append(bbox)
            labels.append(label_of_cat[cid])
            crowd.append(bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", 0)))
        return per_image

    @staticmethod
    def _checked_size(path: Path, width: int, height: int) -> tuple[int, int]:
        """Header size of ``path``; must agree with the JSON when the JSON gives one."""
        w, h = read_image_size(path)
        if width > 0 and height > 0 and (w, h) != (width, height):
            raise DataError(path, f"image is {w}x{h} but the COCO JSON says {width}x{height}; fix the JSON or the image")
        return w, h
