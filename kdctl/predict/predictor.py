"""``kdctl predict``: run any model file over images and write what it finds.

Every model kind (checkpoint, exported safetensors, raw or end-to-end ONNX, TorchScript) is
opened by :func:`kdctl.export.model_file.load_model_file` and sees the same input: every image
letterboxed by the data layer (:mod:`kdctl.data.images`) to one fixed ``(H, W)`` in uint8, the
runner normalising. So the same images give the same detections from every kind of file.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kdctl.classes import NameLookup, hint
from kdctl.errors import KdctlError
from kdctl.predict.outputs import PredictionWriter, output_folder, per_image

DEFAULT_CONF = 0.25  # what a person wants drawn; `kdctl eval` scores at the recipe's 0.05


def resolve_input_size(model, input_size: Sequence[int] | None) -> tuple[int, int]:
    """``--input-size`` checked against the model file, else the file's default. A graph with a
    fixed input takes only that size; PyTorch kinds take multiples of 32."""
    if input_size is None:
        return tuple(int(v) for v in model.default_input_size)
    size = (int(input_size[0]), int(input_size[1]))
    if model.input_size is not None and tuple(model.input_size) != size:
        fixed = "x".join(str(v) for v in model.input_size)
        raise KdctlError(f"--input-size {size[0]} {size[1]}: the {model.kind} file takes {fixed} only; "
                         f"drop --input-size or export again with --input-size {size[0]} {size[1]}")
    if min(size) < 32 or size[0] % 32 or size[1] % 32:
        raise KdctlError(f"--input-size {size[0]} {size[1]}: height and width must be multiples of 32 (e.g. 640 640)")
    return size


def class_filter(names: list[str], wanted: Sequence[str] | None) -> tuple[torch.Tensor | None, list[str]]:
    """``--classes``: a lookup ``[K]`` from the model's class index to the new index (-1: dropped)
    and the kept names in the order given; ``(None, names)`` without ``--classes``."""
    if not wanted:
        return None, list(names)
    lookup = NameLookup(names)
    new = torch.full((len(names),), -1, dtype=torch.long)
    kept: list[str] = []
    for name in wanted:
        idx = lookup.get(name)
        if idx is None:
            raise KdctlError(f"--classes: the model has no class {name!r} {hint(name, names)}")
        if new[idx] >= 0:
            raise KdctlError(f"--classes: {name!r} is given twice")
        new[idx] = len(kept)
        kept.append(names[idx])
    return new, kept


def source_items(sources: Sequence[str], data: str | None, split: str | None):
    """``(items, dataset)``: the :class:`~kdctl.data.images.SourceItem` rows of SOURCE arguments,
    or of ``--data``'s images (with the dataset they index)."""
    from kdctl.data.images import collect_sources, dataset_items

    if data is None:
        return collect_sources(sources), None
    if sources:
        raise KdctlError("give SOURCE paths or --data DATA, not both")
    from kdctl.data import open_dataset

    dataset = open_dataset(data, split, skip_bad=True, check_images=False)
    return dataset_items(dataset), dataset


@contextlib.contextmanager
def _removed_on_failure(writer: PredictionWriter):
    """A run that stops half way (``--strict``, Ctrl-C) leaves no half-written folder behind."""
    try:
        yield
    except BaseException:
        if writer.started:
            shutil.rmtree(writer.folder, ignore_errors=True)
        raise


def predict(model_path: str | Path, sources: Sequence[str] = (), *, data: str | None = None, split: str | None = "val",
            limit: int | None = None, out: Path | None = None, conf: float | None = None, iou: float | None = None,
            max_det: int | None = None, classes: Sequence[str] | None = None, batch_size: int = 8, device: str = "auto",
            input_size: Sequence[int] | None = None, save_labels: bool = False, strict: bool = False,
            force: bool = False, progress: bool = True) -> dict:
    """Run ``model_path`` over ``sources`` (or ``data``'s ``split``) and write the outputs
    (:mod:`kdctl.predict.outputs`). Every check (sources, model, options, output folder) runs
    before anything is written; a run that fails half way (``strict``) removes what it wrote. Returns the summary: ``out``, ``images``, ``boxes``,
    ``skipped`` [(name, reason)], ``seconds``, ``img_s``, the settings used and the files written."""
    from kdctl.data.collate import collate_uint8
    from kdctl.data.images import ImageStream
    from kdctl.data.transforms import pad_colour
    from kdctl.export.model_file import load_model_file
    from kdctl.progressbar import track

    if limit is not None and limit < 1:
        raise KdctlError(f"--limit {limit}: give at least 1")
    # sources first: a typo in a path should not wait for a model to load
    items, dataset = source_items(sources, data, split)
    model = load_model_file(str(model_path), device=device)
    size = resolve_input_size(model, input_size)
    stream = ImageStream(items, size, pad_colour(model.mean), dataset=dataset, strict=strict, limit=limit)
    if dataset is not None:  # images the dataset could not even open (its labels' problems do not matter here)
        stream.skipped += [(f, r) for f, r in dataset.report.skipped]
    remap, names = class_filter(list(model.classes), classes)
    # defaults: the file's own settings; an end-to-end graph has its NMS IoU and max_det baked in
    pp = dict(model.postprocess)
    baked = model.meta.get("end_to_end") if model.kind == "onnx-end-to-end" else None
    if baked:
        pp = {"nms_iou": baked["nms_iou"], "max_per_image": min(int(pp["max_per_image"]), int(baked["max_det"]))}
    conf = DEFAULT_CONF if conf is None else float(conf)
    iou = float(pp["nms_iou"]) if iou is None else float(iou)
    max_det = int(pp["max_per_image"]) if max_det is None else int(max_det)
    for flag, value in (("--conf", conf), ("--iou", iou)):
        if not 0.0 <= value <= 1.0:
            raise KdctlError(f"{flag} {value}: give a number between 0 and 1")
    folder, how = output_folder(out, force)
    writer = PredictionWriter(folder, names, replace=how == "replaced", save_labels=save_labels)

    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate_uint8, num_workers=0)
    expected = stream.expected()
    batches = None if expected is None else math.ceil(expected / batch_size)
    images = boxes = 0
    model_s = 0.0
    start = time.perf_counter()
    with torch.inference_mode(), _removed_on_failure(writer):
        for batch in (track(loader, "predicting", total=batches) if progress else loader):
            t0 = time.perf_counter()
            dets = model.detect(batch.images, batch.valid_sizes, batch.scales, score_thr=conf, nms_iou=iou, max_det=max_det,
                                keep_classes=None if remap is None else remap >= 0)
            b_idx, b_boxes, b_scores, b_labels = (t.cpu() for t in (dets.batch_index, dets.boxes, dets.scores, dets.labels))
            model_s += time.perf_counter() - t0
            if remap is not None:
                b_labels = remap[b_labels]
                keep = b_labels >= 0
                b_idx, b_boxes, b_scores, b_labels = b_idx[keep], b_boxes[keep], b_scores[keep], b_labels[keep]
            for item, rows in zip(batch.items, per_image(b_idx, len(batch))):
                writer.add(item, b_boxes[rows], b_scores[rows], b_labels[rows])
            images += len(batch)
            boxes += int(b_idx.numel())
    seconds = time.perf_counter() - start
    if images == 0:
        listed = "; ".join(f"{n}: {r}" for n, r in stream.skipped[:3])
        raise KdctlError(f"no image could be read ({listed}); check the files")
    settings = {"model": str(model_path), "kind": model.kind, "input_size": list(size), "conf": conf, "iou": iou,
                "max_det": max_det, "device": str(model.device)}
    written = writer.close({**settings, "skipped": [{"file": n, "reason": r} for n, r in stream.skipped]})
    return {**settings, "out": str(folder), "out_chosen": how, "images": images, "boxes": boxes,
            "skipped": [{"file": n, "reason": r} for n, r in stream.skipped], "seconds": seconds,
            "img_s": images / max(seconds, 1e-9), "model_img_s": images / max(model_s, 1e-9),
            "classes": names, "written": written}
