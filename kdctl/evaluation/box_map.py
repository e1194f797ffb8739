"""COCO box mAP of detections (a COCO results list) against ground truth (a COCO dict).

The numbers are COCOeval's (``iouType="bbox"``), computed by pycocotools or, when it is
installed, by faster-coco-eval (same algorithm in C++). Metric values follow ``COCOeval.stats``:
``-1.0`` means the ground truth has no object in that size range (e.g. ``APs`` without small
objects), exactly as pycocotools reports it.

Ids: integral floats and strings of digits (``"2299"``) are read as integers in both ground truth
and predictions, as faster-coco-eval does; pycocotools alone would treat ``"2299"`` and ``2299``
as different images. Ground-truth annotations get fresh ids 1..N (duplicate ids would silently
corrupt COCOeval's matching), ``iscrowd`` defaults to 0 and ``area`` to ``w * h``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
from pathlib import Path

from kdctl.errors import DataError, KdctlError

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
_KEYS = ("image_id", "category_id", "bbox", "score")
_FORMAT = 'each entry is {"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}'


class _IdMismatch(KdctlError):
    """Predictions naming images or categories that the ground truth lacks."""


def _norm_id(value):
    """An image or category id as the evaluator should see it (see the module docstring)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an id")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value:
        return int(value) if value.isdigit() else value
    raise ValueError(f"{value!r} is not an id (use the integer id from the dataset)")


def _is_finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _clean_prediction(entry) -> dict:
    """One prediction reduced to the four keys, ids normalised. Raises ValueError(problem)."""
    if not isinstance(entry, dict):
        raise ValueError(f"is a {type(entry).__name__}, not an object; {_FORMAT}")
    missing = [k for k in _KEYS if k not in entry]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}; {_FORMAT}")
    ids = {}
    for key in ("image_id", "category_id"):
        try:
            ids[key] = _norm_id(entry[key])
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    bbox = entry["bbox"]
    if isinstance(bbox, (str, bytes, dict)) or not hasattr(bbox, "__len__") or len(bbox) != 4 or not all(map(_is_finite, bbox)):
        raise ValueError(f"bbox {bbox!r} must be 4 finite numbers [x, y, w, h] (pixels)")
    bbox = [float(v) for v in bbox]
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"bbox {bbox} has a negative width or height; COCO boxes are [x, y, w, h], not [x1, y1, x2, y2]")
    if not _is_finite(entry["score"]):
        raise ValueError(f"score {entry['score']!r} must be a finite number")
    return {**ids, "bbox": bbox, "score": float(entry["score"])}


def _read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read the file ({exc.__class__.__name__}); it must be UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply to read; fix or re-export the file") from None


def load_predictions(path: str | Path) -> list[dict]:
    """Read a COCO results JSON: a list of ``{image_id, category_id, bbox: [x, y, w, h], score}``.

    Returns clean dicts with only those keys. Raises :class:`DataError` naming the file (and the
    line for bad JSON, the entry index otherwise) when it is not JSON, not a list, or an entry
    lacks a key, has a bbox that is not 4 finite numbers or has negative w/h, or a score that is
    not a finite number. An empty list is valid (a model that detects nothing): :func:`evaluate`
    then reports 0.0 for every metric whose size range has ground truth.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        hint = " (this looks like a ground-truth file)" if isinstance(data, dict) and "annotations" in data else ""
        raise DataError(path, f"not a list: the top level is a JSON {type(data).__name__}{hint}; expected a COCO results list, {_FORMAT}")
    out = []
    for i, entry in enumerate(data):
        try:
            out.append(_clean_prediction(entry))
        except ValueError as exc:
            raise DataError(path, f"entry {i}: {exc}") from None
    return out


def _prepare_gt(gt) -> dict:
    """A copy of a COCO dict that pycocotools and faster-coco-eval evaluate the same way."""
    if not isinstance(gt, dict) or not all(isinstance(gt.get(k), list) for k in ("images", "annotations", "categories")):
        raise KdctlError("ground truth is not a COCO dict: it needs 'images', 'annotations' and 'categories' lists")
    out = {**gt, "images": [], "annotations": [], "categories": []}
    for key in ("images", "categories", "annotations"):
        for i, item in enumerate(gt[key]):
            try:
                if key != "annotations":
                    out[key].append({**item, "id": _norm_id(item["id"])})
                    continue
                x, y, w, h = (float(v) for v in item["bbox"])
                out[key].append({**item, "id": i + 1, "image_id": _norm_id(item["image_id"]),
                                 "category_id": _norm_id(item["category_id"]), "bbox": [x, y, w, h],
                                 "area": float(item.get("area", w * h)), "iscrowd": int(item.get("iscrowd", 0))})
            except KeyError as exc:
                raise KdctlError(f"ground truth {key}[{i}] has no {exc}") from None
            except (TypeError, ValueError) as exc:
                raise KdctlError(f"ground truth {key}[{i}] is not valid COCO: {exc}") from None
    return out


def _check_ids(gt: dict, preds: list[dict]) -> None:
    for key, known, what in (("image_id", {im["id"] for im in gt["images"]}, "image"),
                             ("category_id", {c["id"] for c in gt["categories"]}, "category")):
        bad = [p[key] for p in preds if p[key] not in known]
        if bad:
            raise _IdMismatch(f"{len(bad)} of {len(preds)} predictions use {what} ids that are not in the ground truth "
                              f"(e.g. {bad[0]!r}); the predictions must use the dataset's image ids and category ids: "
                              "check that they were made on this dataset and split")


def _pick_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise KdctlError(f"unknown evaluation backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "pycocotools":
        return backend
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        if backend == "faster_coco_eval":
            raise KdctlError("backend faster_coco_eval: the faster-coco-eval package is not installed; "
                             "pip install faster-coco-eval, or use backend pycocotools") from None
        return "pycocotools"
    return "faster_coco_eval"


def _run_cocoeval(gt: dict, preds: list[dict], backend: str):
    """evaluate/accumulate/summarize with the library's prints swallowed; returns the COCOeval."""
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster_coco_eval":
            # Documented API (faster-coco-eval >= 1.6), not exercised by this project's tests:
            # COCO(dict) int-converts image ids in place, hence the copies made by _prepare_gt.
            from faster_coco_eval import COCO, COCOeval_faster

            coco_gt = COCO(gt)
            ev = COCOeval_faster(coco_gt, coco_gt.loadRes([dict(p) for p in preds]), "bbox", print_function=lambda *a, **k: None)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            if preds:
                coco_dt = coco_gt.loadRes([dict(p) for p in preds])  # loadRes adds keys to what it is given
            else:  # loadRes indexes anns[0]: build the empty result set directly
                coco_dt = COCO()
                coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def evaluate(gt: dict, predictions: list[dict], *, per_class: bool = False, backend: str = "auto") -> dict:
    """COCO box metrics of ``predictions`` (COCO results dicts) against ``gt`` (a COCO dict).

    Returns ``{"metrics": {name: float for name in METRIC_NAMES}, "backend": "pycocotools" |
    "faster_coco_eval", "num_images": int, "num_predictions": int}`` plus, with
    ``per_class=True``, ``"per_class": {category name: AP}`` in ground-truth category order: AP at
    IoU .50:.95, area "all", 100 detections, or ``None`` for a category without ground truth
    (COCOeval's -1 / nan). A name used twice is suffixed with `` (id N)``.

    ``backend="auto"`` uses faster-coco-eval when importable, else pycocotools. An empty
    prediction list is evaluated by pycocotools against an empty result set: every metric is 0.0
    (-1.0 only where the ground truth has no object of that size, as for any predictions).
    Raises :class:`KdctlError` for predictions with image or category ids absent from ``gt``.
    """
    preds = []
    for i, entry in enumerate(predictions):
        try:
            preds.append(_clean_prediction(entry))
        except ValueError as exc:
            raise KdctlError(f"prediction {i}: {exc}") from None
    return _evaluate_clean(_prepare_gt(gt), preds, per_class=per_class, backend=backend)


def _evaluate_clean(gt: dict, preds: list[dict], *, per_class: bool = False, backend: str = "auto") -> dict:
    """:func:`evaluate` on ``_prepare_gt`` output and ``_clean_prediction`` entries (each input
    is validated once, whichever way it came in)."""
    _check_ids(gt, preds)
    used = _pick_backend(backend) if preds else "pycocotools"
    ev = _run_cocoeval(gt, preds, used)
    result = {
        "metrics": {name: float(v) for name, v in zip(METRIC_NAMES, ev.stats)},
        "backend": used,
        "num_images": len(gt["images"]),
        "num_predictions": len(preds),
    }
    if per_class:
        precision = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K]: area "all", maxDets 100
        ap_of = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k]
            p = p[p > -1]
            ap_of[cat_id] = float(p.mean()) if p.size else None
        result["per_class"] = {}
        for cat in gt["categories"]:
            name = str(cat.get("name", cat["id"]))
            if name in result["per_class"]:
                name = f"{name} (id {cat['id']})"
            result["per_class"][name] = ap_of.get(cat["id"])
    return result


def evaluate_files(gt_json_path: str | Path, predictions_path: str | Path, **kw) -> dict:
    """:func:`evaluate` on a COCO ground-truth JSON file and a COCO results JSON file.

    Problems with either file raise :class:`DataError` naming that file; ``kw`` goes to
    :func:`evaluate` (``per_class``, ``backend``).
    """
    gt_path = Path(gt_json_path)
    gt = _read_json(gt_path)
    preds = load_predictions(predictions_path)
    try:
        gt = _prepare_gt(gt)
    except KdctlError as exc:
        raise DataError(gt_path, str(exc)) from None
    try:
        return _evaluate_clean(gt, preds, **kw)
    except _IdMismatch as exc:
        raise DataError(predictions_path, f"{exc} (ground truth: {gt_path})") from None


def evaluate_data(data: str, predictions_path: str | Path, *, split: str | None = "val", **kw) -> dict:
    """:func:`evaluate` against the ground truth named by a CLI ``DATA`` argument.

    A COCO ``.json`` is evaluated as written (:func:`evaluate_files`): its own ``area`` values
    decide small/medium/large, so the numbers are the official evaluator's. Other formats (YOLO,
    VOC, shapes, recipes) go through ``DetectionDataset.to_coco()``: area = box area, ignore
    regions as crowd. ``kw`` goes to :func:`evaluate`.
    """
    path = Path(data)
    if path.suffix.lower() == ".json" and path.is_file():
        return evaluate_files(path, predictions_path, **kw)
    from kdctl.data import open_dataset

    gt = _prepare_gt(open_dataset(data, split, check_images=False).to_coco())
    preds = load_predictions(predictions_path)
    try:
        return _evaluate_clean(gt, preds, **kw)
    except _IdMismatch as exc:
        raise DataError(predictions_path, f"{exc} (ground truth: {data}, split {split})") from None
