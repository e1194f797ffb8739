"""Pascal VOC XML datasets as a :class:`DetectionDataset`.

Two layouts are recognised under ``root``:

* ``annotations/*.xml`` + ``images/`` (e.g. the raccoon dataset), split lists in ``splits/``;
* ``Annotations/*.xml`` + ``JPEGImages/`` (the VOC devkit), split lists in ``ImageSets/Main/``.

Each XML's ``<filename>`` names its image inside the images folder (``<stem>.jpg`` when the
element is absent).

Box convention: ``xmin, ymin, xmax, ymax`` are used **as written** as xyxy pixel
coordinates. The original VOC devkit counts pixels from 1, so strictly a devkit box is
``[xmin - 1, ymin - 1, xmax, ymax]`` in 0-based half-open pixels; the sub-pixel difference is
ignored here, which matches how the raccoon annotations (and most VOC exporters) are written.
Boxes are then clipped / filtered by :func:`sanitize_boxes`.

``difficult=1`` objects become ignore regions (``ignore`` / ``ignore_labels``), like COCO crowd.
"""
from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdctl.data.dataset import DetectionDataset, ImageRecord, LoadReport, read_image_size, sanitize_boxes, stem_image_ids
from kdctl.errors import DataError, read_text

_LAYOUTS = (("annotations", "images"), ("Annotations", "JPEGImages"))
_SPLIT_PATTERNS = ("ImageSets/Main/{}.txt", "splits/{}.txt", "splits/{}_labels.csv", "splits/{}.csv")


@dataclass
class _Parsed:
    """One XML file before label mapping: object names, xyxy boxes [N, 4], difficult flags [N]."""

    xml: Path
    image: Path
    width: int
    height: int
    names: list[str]
    boxes: np.ndarray
    difficult: np.ndarray


def _number(elem: ET.Element | None, tag: str, xml: Path, where: str) -> float | None:
    """Float value of child ``tag`` of ``elem``; None when absent/empty; DataError when not numeric."""
    text = elem.findtext(tag) if elem is not None else None
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise DataError(xml, f"{where}: <{tag}> is {text.strip()[:30]!r}, not a number; fix the annotation") from None


def parse_voc_xml(xml: Path, image_dir: Path) -> _Parsed:
    """Parse one annotation file. Size comes from ``<size>`` or, when missing or zero, from the
    image header. Raises DataError naming the file (and line for malformed XML)."""
    if not xml.is_file():
        raise DataError(xml, "annotation file not found; fix the split list or add the XML")
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        line = exc.position[0] if getattr(exc, "position", None) else None
        raise DataError(xml, f"malformed XML ({str(exc).split(':')[0]}); fix or remove the file", line=line) from None
    except OSError as exc:
        raise DataError(xml, f"cannot read annotation file ({exc.__class__.__name__})") from None
    filename = (root.findtext("filename") or "").strip() or f"{xml.stem}.jpg"
    if Path(filename).is_absolute() or ".." in Path(filename).parts:
        raise DataError(xml, f"<filename> {filename!r} points outside {image_dir}; give the image's name inside that folder")
    image = image_dir / filename
    size = root.find("size")
    width, height = _number(size, "width", xml, "<size>"), _number(size, "height", xml, "<size>")
    if not width or not height:
        width, height = read_image_size(image)
    names, boxes, difficult = [], [], []
    for k, obj in enumerate(root.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        where = f"object #{k} ({name or 'no name'})"
        if not name:
            raise DataError(xml, f"{where}: <name> is missing; add the class name")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(xml, f"{where}: <bndbox> is missing; add xmin/ymin/xmax/ymax")
        coords = [_number(bnd, t, xml, where) for t in ("xmin", "ymin", "xmax", "ymax")]
        missing = [t for t, v in zip(("xmin", "ymin", "xmax", "ymax"), coords) if v is None]
        if missing:
            raise DataError(xml, f"{where}: <bndbox> lacks {', '.join(missing)}; add the coordinates")
        names.append(name)
        boxes.append(coords)
        difficult.append((obj.findtext("difficult") or "0").strip() in ("1", "true", "True"))
    return _Parsed(xml, image, int(width), int(height), names,
                   np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(difficult, bool))


class VocDataset(DetectionDataset):
    """Pascal VOC XML annotations.

    Args:
        root: dataset folder (see module docstring for the two layouts).
        split: None for every XML; a split name, looked up as the first existing of
            ``ImageSets/Main/{split}.txt``, ``splits/{split}.txt``, ``splits/{split}_labels.csv``,
            ``splits/{split}.csv``; or a path to such a file (absolute or relative to ``root``).
            A ``.txt`` lists image ids or file names, one per line; a ``.csv`` has a header with
            a ``filename`` column (repeated rows collapse to one image).
        classes: class names in label order; None -> sorted set of object names in the
            selected XMLs. With a given list, an unknown object name is an error.
        skip_bad: skip a bad XML / image and record ``(file, reason)`` in ``report.skipped``.
        min_box_size: boxes narrower or shorter than this (pixels, after clipping) are dropped.
        transforms: optional ``torchvision.transforms.v2`` callable applied to each sample.

    Images are listed in sorted XML-stem order; ``image_id`` is ``int(stem)`` when all stems
    are unique integers, else the index in that order.
    """

    format = "voc"

    def __init__(self, root, split: str | None = None, *, classes: list[str] | None = None,
                 skip_bad: bool = False, min_box_size: float = 1.0, transforms=None):
        self.root = Path(root)
        self.ann_dir, self.image_dir = self._layout()
        report = LoadReport()
        xmls = self._select(split)

        parsed: list[_Parsed] = []
        for xml in xmls:
            try:
                p = parse_voc_xml(xml, self.image_dir)
                w, h = read_image_size(p.image)  # existence / readability, and size agreement
                if (w, h) != (p.width, p.height):
                    raise DataError(xml, f"<size> says {p.width}x{p.height} but {p.image.name} is {w}x{h}; fix <size>")
                if classes is not None:
                    unknown = sorted(set(p.names) - set(classes))
                    if unknown:
                        raise DataError(xml, f"object name(s) {unknown} not in the given classes {list(classes)}; "
                                             "fix the annotation or the class list")
                parsed.append(p)
            except DataError as exc:
                report.skip_or_raise(exc, skip_bad)

        if classes is None:
            classes = sorted({n for p in parsed for n in p.names})
        label_of = {n: i for i, n in enumerate(classes)}
        ids = stem_image_ids([p.xml for p in parsed])
        records = []
        for p, img_id in zip(parsed, ids):
            labels = np.asarray([label_of[n] for n in p.names], np.int64)
            boxes, keep = sanitize_boxes(p.boxes[~p.difficult], p.width, p.height, report, min_box_size)
            ign, keep_ign = sanitize_boxes(p.boxes[p.difficult], p.width, p.height, report, min_box_size)
            records.append(ImageRecord(
                image_id=img_id, file_name=p.image.relative_to(self.image_dir).as_posix(),
                width=p.width, height=p.height, boxes=boxes, labels=labels[~p.difficult][keep],
                ignore=ign, ignore_labels=labels[p.difficult][keep_ign], path=p.image,
            ))
        super().__init__(records, classes, None, report, source=str(self.root), transforms=transforms, skip_bad=skip_bad)

    # ------------------------------------------------------------------ layout and splits
    def _layout(self) -> tuple[Path, Path]:
        if not self.root.is_dir():
            raise DataError(self.root, "VOC root folder not found; check data.path")
        for ann, img in _LAYOUTS:
            if (self.root / ann).is_dir() and (self.root / img).is_dir():
                return self.root / ann, self.root / img
        raise DataError(self.root, "no VOC layout found: expected annotations/ + images/ or Annotations/ + JPEGImages/")

    def available_splits(self) -> list[str]:
        """Split names found under ``ImageSets/Main`` and ``splits``."""
        names = set()
        for folder in (self.root / "ImageSets" / "Main", self.root / "splits"):
            for f in folder.glob("*") if folder.is_dir() else ():
                if f.suffix in (".txt", ".csv"):
                    names.add(f.stem[: -len("_labels")] if f.stem.endswith("_labels") else f.stem)
        return sorted(names)

    def _split_file(self, split: str) -> Path:
        for pattern in _SPLIT_PATTERNS:
            f = self.root / pattern.format(split)
            if f.is_file():
                return f
        as_path = Path(split) if Path(split).is_absolute() else self.root / split
        if as_path.is_file() and as_path.suffix in (".txt", ".csv"):
            return as_path
        raise DataError(self.root, f"unknown split {split!r}; available: {self.available_splits() or 'none'} "
                                   "(or pass a path to a .txt/.csv split file)")

    def _select(self, split: str | None) -> list[Path]:
        """Sorted XML files of the split."""
        if split is None:
            return sorted(self.ann_dir.glob("*.xml"))
        f = self._split_file(split)
        text = read_text(f, "split list")
        if f.suffix == ".csv":
            try:
                reader = csv.DictReader(io.StringIO(text, newline=""))
                if "filename" not in (reader.fieldnames or []):
                    raise DataError(f, f"CSV header {reader.fieldnames} has no 'filename' column", line=1)
                entries = [row["filename"] or "" for row in reader]
            except csv.Error as exc:
                raise DataError(f, f"malformed CSV ({exc}); fix the split list") from None
        else:
            entries = [ln.split()[0] for ln in text.splitlines() if ln.strip()]
        stems = sorted(dict.fromkeys(Path(e.strip()).stem for e in entries if e.strip()))
        # A listed stem without an XML fails (or is skipped) when parsed, naming the XML path.
        return [self.ann_dir / f"{s}.xml" for s in stems]
