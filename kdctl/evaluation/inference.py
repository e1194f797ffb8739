"""Inference over a dataset and COCO evaluation of a model or a checkpoint."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Subset

from kdctl.data import DetectionDataset, build_dataset, data_config
from kdctl.data.transforms import build_transforms
from kdctl.artifact.stored import load_detector
from kdctl.engine.loader import eval_loader
from kdctl.engine.device import autocast, pick_device
from kdctl.errors import DataError, KdctlError
from kdctl.evaluation.box_map import evaluate
from kdctl.progressbar import track
from kdctl.recipe import DataConfig, EvalConfig


def val_transforms(data: DataConfig, mean, std):
    """The evaluation pipeline: keep-ratio resize + normalise, no flip."""
    return build_transforms(False, short_side=data.short_side, max_side=data.max_side, hflip=0.0, mean=mean, std=std)


@torch.no_grad()
def predict_dataset(model, dataset: DetectionDataset, cfg: EvalConfig, *, device: torch.device, amp: str = "off",
                    num_workers: int = 0, pad_divisor: int = 32, description: str | None = "eval",
                    indices: Sequence[int] | None = None, unreadable: list | None = None) -> list[dict]:
    """COCO result dicts for every image of ``dataset`` (whose transforms must be the
    evaluation ones), or only those at ``indices`` (a rank's shard), with the dataset's
    category ids. The model is put in eval mode and restored afterwards. ``description``
    None: no progress bar. Images that fail to decode with ``data.skip_bad`` are appended to
    ``unreadable`` as ``(file, reason, image_id)``; score without them (:func:`without_images`)."""
    was_training = model.training
    model.eval()
    results: list[dict] = []
    source = dataset if indices is None else Subset(dataset, list(indices))
    loader = eval_loader(source, batch_size=cfg.batch_size, num_workers=num_workers, pad_divisor=pad_divisor)
    try:
        for batch in (loader if description is None else track(loader, description, total=len(loader))):
            if unreadable is not None:
                unreadable.extend(batch.unreadable)
            if len(batch) == 0:
                continue
            images = batch.images.to(device, non_blocking=True)
            with autocast(amp, device):
                dets = model.predict(images, batch.valid_sizes, batch.scales, score_thr=cfg.score_thr, nms_iou=cfg.nms_iou,
                                     topk_pre_nms=cfg.topk_pre_nms, max_per_image=cfg.max_per_image)
            results.extend(dets.to_coco(batch.image_ids, dataset.cat_ids))
    finally:
        model.train(was_training)
    return results


def evaluate_model(model, dataset: DetectionDataset, cfg: EvalConfig, *, device: torch.device, amp: str = "off",
                   num_workers: int = 0, pad_divisor: int = 32, gt: dict | None = None) -> dict:
    """Run :func:`predict_dataset` and score it (see :func:`kdctl.evaluation.box_map.evaluate`); the
    result also carries ``"predictions"`` (the COCO result list)."""
    unreadable: list = []
    preds = predict_dataset(model, dataset, cfg, device=device, amp=amp, num_workers=num_workers, pad_divisor=pad_divisor,
                            unreadable=unreadable)
    return scored(gt if gt is not None else dataset.to_coco(), preds, unreadable, per_class=cfg.per_class)


def scored(gt: dict, preds: list[dict], unreadable: list, *, per_class: bool = False) -> dict:
    """:func:`evaluate` of ``preds`` on ``gt`` without the images that could not be decoded
    (``(file, reason, image_id)`` rows, as :func:`predict_dataset` lists them): a skipped
    image is left out of the score, as one skipped when the dataset was read. The result also
    carries ``"predictions"`` and ``"unreadable"`` (``[{"file", "reason"}]``)."""
    result = evaluate(without_images(gt, {i for _, _, i in unreadable}), preds, per_class=per_class)
    result["predictions"] = preds
    result["unreadable"] = [{"file": f, "reason": r} for f, r, _ in unreadable]
    return result


def without_images(gt: dict, ids: set) -> dict:
    """The COCO ground truth ``gt`` without the images of ``ids`` and their annotations."""
    if not ids:
        return gt
    return {**gt, "images": [im for im in gt["images"] if im["id"] not in ids],
            "annotations": [a for a in gt["annotations"] if a["image_id"] not in ids]}


def evaluate_checkpoint(checkpoint: str | Path, data: str | None, *, split: str = "val", device: str = "auto",
                        batch_size: int | None = None, per_class: bool = False, amp: str = "off",
                        skip_bad: bool = False) -> dict:
    """Score a checkpoint on ``data`` (a DATA argument as ``kdctl eval``; None: the recipe's own
    validation data); ``skip_bad``: skip unreadable images as ``data.skip_bad`` does. Returns
    :func:`evaluate`'s dict plus ``"predictions"`` and ``"unreadable"``."""
    dev = pick_device(device)
    model, recipe, meta = load_detector(checkpoint, device=dev)
    data_cfg = data_config(data, recipe.data, skip_bad=skip_bad)
    # resize like the training recipe did, whatever the data source
    data_cfg = data_cfg.model_copy(update={"short_side": recipe.data.short_side, "max_side": recipe.data.max_side})
    ds = build_dataset(data_cfg, split, transforms=val_transforms(data_cfg, model.mean, model.std))
    if len(ds.classes) != model.num_classes:
        raise KdctlError(
            f"{data}: dataset has {len(ds.classes)} classes but the checkpoint's model predicts {model.num_classes}; "
            "evaluate on the data it was trained for"
        )
    cfg = recipe.eval.model_copy(update={"per_class": per_class, **({"batch_size": batch_size} if batch_size else {})})
    return evaluate_model(model, ds, cfg, device=dev, amp=amp, num_workers=min(2, data_cfg.num_workers))


class _Letterboxed(torch.utils.data.Dataset):
    """A labelled dataset's images letterboxed to one input ``size`` (the data layer's
    :func:`~kdctl.data.transforms.letterbox`), for a model file: (uint8 ``[3, H, W]``, (h', w'),
    (h, w), image id)."""

    def __init__(self, dataset: DetectionDataset, size: tuple[int, int], fill):
        self.dataset, self.size, self.fill = dataset, size, fill

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from kdctl.data.transforms import letterbox

        rec = self.dataset.records[i]
        try:
            image = self.dataset.load_image(rec)
        except DataError as exc:
            return self.dataset.unreadable(i, exc)  # raises without data.skip_bad
        boxed, valid = letterbox(image, self.size, self.fill)
        return boxed, valid, (int(image.shape[-2]), int(image.shape[-1])), rec.image_id


def _stack(items):
    """(images, valid sizes, scales, image ids, unreadable rows) of a batch; images that
    failed to decode (dicts from :meth:`DetectionDataset.unreadable`) are left out."""
    unreadable = [(f, r, it["image_id"]) for it in items if isinstance(it, dict) for f, r in it["unreadable"]]
    items = [it for it in items if not isinstance(it, dict)]
    if not items:
        return None, None, None, None, unreadable
    valid = torch.tensor([v for _, v, _, _ in items], dtype=torch.long)
    orig = torch.tensor([o for _, _, o, _ in items], dtype=torch.float32)
    return (torch.stack([b for b, _, _, _ in items]), valid, valid.float() / orig,
            torch.tensor([i for _, _, _, i in items], dtype=torch.long), unreadable)


def evaluate_model_file(model, data: str | None, *, split: str = "val", batch_size: int | None = None,
                        per_class: bool = False, num_workers: int = 0, description: str | None = "eval",
                        skip_bad: bool = False) -> dict:
    """Score a loaded model file (:class:`kdctl.export.model_file.ModelFile`: an ONNX, TorchScript,
    exported or training checkpoint) through its own runtime on ``data`` (None: the data of the
    recipe stored in the file), images letterboxed to its input size, with the file's own
    postprocess settings. Returns :func:`evaluate`'s dict plus ``"predictions"``."""
    from kdctl.data.transforms import pad_colour

    data_cfg = data_config(data, model.recipe.data, skip_bad=skip_bad)
    ds = build_dataset(data_cfg, split)
    if len(ds.classes) != len(model.classes):
        raise KdctlError(f"{data or data_cfg.format}: dataset has {len(ds.classes)} classes but {model.path.name} predicts "
                         f"{len(model.classes)}; evaluate on the data it was trained for")
    size = tuple(model.input_size or model.default_input_size)
    bs = batch_size or model.recipe.eval.batch_size
    loader = torch.utils.data.DataLoader(_Letterboxed(ds, size, pad_colour(model.mean)), batch_size=bs, shuffle=False,
                                         num_workers=num_workers, collate_fn=_stack)
    preds: list[dict] = []
    unreadable: list = []
    for images, valid, scales, ids, bad in (loader if description is None else track(loader, description, total=len(loader))):
        unreadable += bad
        if images is not None:
            preds.extend(model.detect(images, valid, scales).to_coco(ids, ds.cat_ids))
    result = scored(ds.to_coco(), preds, unreadable, per_class=per_class)
    result["model_file"] = {"path": str(model.path), "kind": model.kind, "input_size": list(size)}
    return result
