"""Ultralytics/YOLO datasets (``data.yaml`` + ``images/`` + ``labels/``) as a :class:`DetectionDataset`.

Layout::

    data.yaml          path: <root>   train: images/train   val: images/val   names: {0: person, ...}
    <root>/images/train/a.jpg
    <root>/labels/train/a.txt      one line per box: ``class cx cy w h``, normalised to [0, 1]

* ``path`` is the dataset root (relative to the yaml's folder when relative; the yaml's folder
  when absent). ``train`` / ``val`` / ``test`` each name a folder of images (searched
  recursively), a ``.txt`` file listing image paths (relative entries resolve against the
  list file's folder), or a list of those.
* The label file of ``.../images/<x>/a.jpg`` is ``.../labels/<x>/a.txt`` (the last ``images``
  path component becomes ``labels``). A missing label file means an image without boxes.
* Boxes are denormalised with the size from the image header and converted to xyxy pixels.
* ``image_id`` is ``int(stem)`` when every stem is a unique non-negative integer (COCO-style
  names like ``000000000009.jpg``), else the index in the sorted list of image paths.
* ``file_name`` is the image path relative to the root (absolute if outside it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdctl.data.dataset import DetectionDataset, ImageRecord, LoadReport, read_image_size, sanitize_boxes, stem_image_ids
from kdctl.errors import DataError, os_problem, read_text

IMAGE_SUFFIXES = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")


def label_path(image: Path) -> Path:
    """``.../images/<x>/a.jpg`` -> ``.../labels/<x>/a.txt`` (replace the last ``images`` component)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def parse_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one YOLO label file. Returns ``(cxcywh float64 [N, 4] normalised, labels int64 [N])``.

    Raises DataError with the 1-based line number for a line that is not 5 numbers or whose
    class is not an integer in ``[0, num_classes)``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read label file ({exc.__class__.__name__}); fix or delete it") from None
    rows, labels = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            values = None
        if values is None or len(values) != 5:
            raise DataError(path, f"expected 5 numbers 'class cx cy w h', got {line.strip()[:60]!r}; fix the line", line=lineno)
        cls = values[0]
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise DataError(path, f"class id {tokens[0]} is not an integer in [0, {num_classes}) "
                                  f"(data.yaml has {num_classes} names); fix the label or the names", line=lineno)
        rows.append(values[1:])
        labels.append(int(cls))
    return np.asarray(rows, np.float64).reshape(-1, 4), np.asarray(labels, np.int64)


class YoloDataset(DetectionDataset):
    """A YOLO dataset described by an Ultralytics ``data.yaml``.

    Args:
        data_yaml: the dataset description file.
        split: ``"train"``, ``"val"``, ``"test"`` (or any other key of the yaml), or None for
            every split present among train/val/test, concatenated without duplicates.
        skip_bad: skip images that are missing/unreadable or whose label file is malformed,
            recording ``(file, reason)`` in ``report.skipped``, instead of raising.
        min_box_size: boxes narrower or shorter than this (pixels, after clipping) are dropped.
        transforms: optional ``torchvision.transforms.v2`` callable applied to each sample.
    """

    format = "yolo"

    def __init__(self, data_yaml, split: str | None = "train", *, skip_bad: bool = False,
                 min_box_size: float = 1.0, transforms=None):
        self.data_yaml = Path(data_yaml)
        cfg = self._read_yaml()
        if not isinstance(cfg.get("path") or ".", str):
            raise DataError(self.data_yaml, f"key 'path': expected the dataset folder, got {cfg['path']!r}")
        root = Path(cfg.get("path") or ".")
        self.root = root if root.is_absolute() else self.data_yaml.parent / root
        classes = self._parse_names(cfg)
        report = LoadReport()

        images = self._split_images(cfg, split)
        ids = stem_image_ids(images)
        records = []
        for img, img_id in zip(images, ids):
            try:
                records.append(self._record(img, img_id, len(classes), report, min_box_size))
            except DataError as exc:
                report.skip_or_raise(exc, skip_bad)
        super().__init__(records, classes, None, report, source=str(self.data_yaml), transforms=transforms, skip_bad=skip_bad)

    # ------------------------------------------------------------------ yaml
    def _read_yaml(self) -> dict:
        import yaml

        if not self.data_yaml.is_file():
            raise DataError(self.data_yaml, "data.yaml not found; check data.path in the recipe")
        try:
            cfg = yaml.safe_load(self.data_yaml.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise DataError(self.data_yaml, f"invalid YAML ({problem}); fix the file",
                            line=mark.line + 1 if mark is not None else None) from None
        except UnicodeDecodeError as exc:
            raise DataError(self.data_yaml, f"is not UTF-8 text (byte at offset {exc.start}); save it as UTF-8") from None
        except RecursionError:
            raise DataError(self.data_yaml, "nested too deeply to read; flatten it") from None
        except OSError as exc:
            raise DataError(self.data_yaml, f"cannot read file: {os_problem(exc)}") from None
        if not isinstance(cfg, dict):
            raise DataError(self.data_yaml, "expected a mapping with keys 'path', 'train', 'val', 'names'")
        return cfg

    def _parse_names(self, cfg: dict) -> list[str]:
        """Class names from ``names`` (a list, or a dict with keys 0..K-1)."""
        names = cfg.get("names")
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        if isinstance(names, dict) and names:
            try:
                by_idx = {int(k): str(v) for k, v in names.items()}
            except (TypeError, ValueError):
                by_idx = {}
            if sorted(by_idx) == list(range(len(names))):
                return [by_idx[i] for i in range(len(names))]
            raise DataError(self.data_yaml, "key 'names': dict keys must be the class indices 0..K-1")
        raise DataError(self.data_yaml, "key 'names' is missing or empty; add the class names (list or {index: name})")

    def _split_images(self, cfg: dict, split: str | None) -> list[Path]:
        """Image paths of one split (sorted) or of all splits (concatenated, deduplicated)."""
        if split is not None:
            if cfg.get(split) in (None, "", []):
                present = [k for k in SPLITS if cfg.get(k)]
                raise DataError(self.data_yaml, f"key '{split}' is missing; splits present: {present or 'none'}")
            return self._source_images(cfg[split], split)
        keys = [k for k in SPLITS if cfg.get(k)]
        if not keys:
            raise DataError(self.data_yaml, f"none of the keys {list(SPLITS)} is present; add at least 'train'")
        seen, out = set(), []
        for k in keys:
            for p in self._source_images(cfg[k], k):
                if p.resolve() not in seen:
                    seen.add(p.resolve())
                    out.append(p)
        return out

    def _source_images(self, source, key: str) -> list[Path]:
        """Expand a split value: a folder, a ``.txt`` list of image paths, or a list of those."""
        sources = source if isinstance(source, list) else [source]
        out: list[Path] = []
        for src in sources:
            if not isinstance(src, str):
                raise DataError(self.data_yaml, f"key '{key}': expected a path or list of paths, got {src!r}")
            p = Path(src) if Path(src).is_absolute() else self.root / src
            if p.is_dir():
                out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            elif p.is_file() and p.suffix == ".txt":
                lines = [ln.strip() for ln in read_text(p, "image list").splitlines()]
                out += sorted(Path(ln) if Path(ln).is_absolute() else p.parent / ln for ln in lines if ln)
            else:
                raise DataError(self.data_yaml, f"key '{key}': {p} is neither an image folder nor a .txt image list; "
                                                f"check 'path' and '{key}'")
        return out

    # ------------------------------------------------------------------ one image
    def _record(self, img: Path, img_id: int, num_classes: int, report: LoadReport,
                min_box_size: float) -> ImageRecord:
        """Read the header of ``img`` and its label file; boxes become xyxy pixels."""
        width, height = read_image_size(img)
        lbl = label_path(img)
        if lbl.is_file():
            cxcywh, labels = parse_label_file(lbl, num_classes)
        else:
            cxcywh, labels = np.zeros((0, 4)), np.zeros((0,), np.int64)
        scale = np.array([width, height, width, height], np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite boxes are dropped (and counted) below
            half = cxcywh[:, 2:] / 2
            xyxy = np.concatenate([cxcywh[:, :2] - half, cxcywh[:, :2] + half], axis=1) * scale
        boxes, keep = sanitize_boxes(xyxy, width, height, report, min_box_size)
        try:
            file_name = img.relative_to(self.root).as_posix()
        except ValueError:
            file_name = img.as_posix()
        return ImageRecord(image_id=img_id, file_name=file_name, width=width, height=height,
                           boxes=boxes, labels=labels[keep], path=img)
