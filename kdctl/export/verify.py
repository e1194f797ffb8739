"""Checking an exported artifact against the PyTorch detector it came from.

Images. Real photos from the shared data folder (``../shared/data`` beside the repository, or
beside the working directory): the first 2 of ``coco8/images/val`` and the first 2 of
``raccoon-voc/images`` (sorted names), plus the first 2 images of the checkpoint's own
validation data, on which a trained detector actually detects something. Without the shared
folder, shapes images stand in and the result says so. ``--images`` replaces all of them.

Preprocessing is the data layer's :func:`kdctl.data.transforms.letterbox` (the eval
pipeline's keep-ratio bilinear resize with antialias, fitted into the fixed export input
``H x W`` with scale ``min(H / h, W / w)``, padded at the bottom/right with the mean colour),
then :func:`kdctl.export.model_file.normalise` (``(x - 255 mean) / (255 std)``): the input every
model-file kind sees (:func:`preprocess`). For an image whose orientation matches the input
size, the resize is exactly ``kdctl eval``'s.

Checks, for each batch (every image alone; with a dynamic batch also the first two together):

1. raw outputs: ``max |export - pytorch|`` per output name, over all images; passes at
   :data:`RAW_RTOL` (1e-3) relative to the output's largest magnitude, ``1e-3 * max(1,
   max|pytorch output|)``, for float32 exports. Most outputs differ by ~1e-6; the bound is
   loose for one case: the head's GroupNorm on a 1 x 1 map (P7 of a 128-px input, two values
   per group at width 64) is ill-conditioned, and ONNX lowers GroupNorm to
   InstanceNormalization, which rounds differently: the demo's CrossKD student differed there
   by 2e-4 on outputs of magnitude < 1, with all 600 detections identical. The detections
   (check 2) are held to 1e-4. float16 exports pass at ``HALF_ATOL + HALF_RTOL * max|pytorch
   output|`` per output (see :func:`tolerance`).
2. detections, both through the same :func:`kdctl.models.postprocess.postprocess` with the
   recipe's eval settings. *Identical* means: the same number of detections, the same image
   and class for every row in the same order (rows whose scores tie within :data:`ATOL` may
   trade places, :func:`untie`: a barely trained model has many scores equal to 1e-7, which
   onnxruntime's sigmoid orders differently), every score within :data:`ATOL` (absolute), and
   every box coordinate within :data:`ATOL` relative to its value (``|d| <= 1e-4 * max(1, |x|)``)
   in the network's input pixels (original-image pixels times the image's scale, so that
   resizing a photo neither hides nor magnifies a difference). Relative, because a box is
   decoded from raw outputs times the level's stride (up to 128): a 1e-6 difference of a GFL
   distribution logit moves a P7 box side by about 1e-6 * 16 bins * 128 px.
   float16 exports are not expected to be identical; they report how many float32
   detections have a same-class float16 detection with IoU >= 0.9 (informational).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.ops import box_iou

from kdctl.data.transforms import letterbox, pad_colour
from kdctl.errors import KdctlError
from kdctl.models.postprocess import Detections

ATOL = 1e-4
RAW_RTOL = 1e-3  # raw float32 outputs, relative to the output's largest magnitude (see the module docstring)
HALF_ATOL, HALF_RTOL = 1e-2, 1e-2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository (or the working directory), if present."""
    repo = Path(__file__).resolve().parents[2]
    for cand in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def _first_images(folder: Path, n: int) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n] if folder.is_dir() else []


def verification_images(recipe, images: Path | None = None) -> tuple[list[tuple[str, Tensor]], str]:
    """(label, uint8 ``[3, h, w]``) pairs to verify on, and a note saying where they came from.
    ``images``: a file or a folder (its first 8 images by name) replacing the defaults."""
    from kdctl.data import build_dataset
    from kdctl.data.dataset import decode_image

    if images is not None:
        files = [images] if images.is_file() else _first_images(images, 8)
        if not files:
            raise KdctlError(f"{images}: no images there (.jpg, .jpeg, .png, .bmp); give an image file or a folder of them")
        return [(str(f), decode_image(f)) for f in files], f"{len(files)} images from {images}"
    out: list[tuple[str, Tensor]] = []
    shared = shared_data_dir()
    notes = []
    if shared is not None:
        for sub in ("coco8/images/val", "raccoon-voc/images"):
            out += [(f"{sub}/{f.name}", decode_image(f)) for f in _first_images(shared / sub, 2)]
        notes.append(f"{len(out)} photos from {shared}")
    try:
        ds = build_dataset(recipe.data, "val", check_images=False)
        own = [(f"{recipe.data.format} val #{i}", ds.load_image(ds.records[i])) for i in range(min(2, len(ds)))]
    except KdctlError:
        own = []  # the recipe's data is not here (another machine's paths): photos only
    out += own
    if own:
        notes.append(f"{len(own)} from the checkpoint's own val data ({recipe.data.format})")
    if not out:
        from kdctl.data.shapes import ShapesDataset

        ds = ShapesDataset(num_images=4, image_size=256, num_classes=10, seed=1)
        out = [(f"shapes #{i}", ds.load_image(ds.records[i])) for i in range(4)]
        notes.append("4 shapes images (no shared data folder and no readable recipe data)")
    elif shared is None:
        notes.append("../shared/data is absent: no photos")
    return out, "; ".join(notes)


def letterboxed(images: list[Tensor], size: tuple[int, int], mean) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 ``[3, h, w]`` images -> (uint8 ``[N, 3, H, W]`` letterboxed by the data layer's
    :func:`kdctl.data.transforms.letterbox` with ``pad_colour(mean)``, ``valid_sizes`` int64
    ``[N, 2]`` (h', w'), ``scales`` float32 ``[N, 2]`` resized / original for (y, x)), the
    input every model-file kind takes (:mod:`kdctl.export.model_file`)."""
    fill = pad_colour(mean)
    boxed = [letterbox(im, size, fill) for im in images]
    valid_t = torch.tensor([v for _, v in boxed], dtype=torch.long)
    orig = torch.tensor([[int(im.shape[-2]), int(im.shape[-1])] for im in images], dtype=torch.float32)
    return torch.stack([b for b, _ in boxed]), valid_t, valid_t.float() / orig


def preprocess(images: list[Tensor], size: tuple[int, int], mean, std) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`letterboxed`, normalised as the runner does (:func:`kdctl.export.model_file.normalise`):
    float32 ``[N, 3, H, W]``, ``valid_sizes``, ``scales``. For an image of the input's size
    this is exactly ``kdctl eval``'s pipeline (keep-ratio resize, ``ToFloatNormalize``)."""
    from kdctl.export.model_file import normalise

    x, valid, scales = letterboxed(images, size, mean)
    return normalise(x, mean, std), valid, scales


def tolerance(reference: Tensor, half: bool) -> float:
    """Allowed ``max |export - pytorch|`` for one output (see the module docstring)."""
    if not half:
        return RAW_RTOL * max(1.0, float(reference.abs().max()))
    return HALF_ATOL + HALF_RTOL * float(reference.abs().max())


@dataclass
class Check:
    """One verified batch: per-output max abs differences and the detection comparison."""

    batch: int
    diffs: dict[str, float]
    tols: dict[str, float]
    detections: dict

    @property
    def outputs_ok(self) -> bool:
        return all(self.diffs[k] <= self.tols[k] for k in self.diffs)


def untie(ref: Detections, got: Detections) -> Detections:
    """``got`` with its rows reordered to follow ``ref``'s where their scores tie: for each
    reference row in order, the first unused row of ``got`` of the same image and class whose
    score is within :data:`ATOL` and box nearest (else the row in that place). Unchanged when
    the counts differ or ``got`` is not best first within each image, so only rows of tied
    scores move and a real difference of order still fails."""
    n = ref.labels.numel()
    if n != got.labels.numel() or n == 0:
        return got
    if bool(((got.batch_index[1:] == got.batch_index[:-1]) & (got.scores[1:] > got.scores[:-1] + ATOL)).any()):
        return got
    fits = ((ref.batch_index[:, None] == got.batch_index[None]) & (ref.labels[:, None] == got.labels[None])
            & ((ref.scores[:, None] - got.scores[None]).abs() <= ATOL))  # [D, D]
    dist = torch.cdist(ref.boxes.double(), got.boxes.double(), p=float("inf")).masked_fill(~fits, float("inf"))
    order, free = [], torch.ones(n, dtype=torch.bool)
    for i in range(n):  # verification only: a few hundred rows
        j = int(dist[i].masked_fill(~free, float("inf")).argmin())
        j = j if bool(fits[i, j] & free[j]) else (i if bool(free[i]) else int(free.nonzero()[0]))
        order.append(j)
        free[j] = False
    idx = torch.tensor(order)
    return Detections(batch_index=got.batch_index[idx], boxes=got.boxes[idx], scores=got.scores[idx], labels=got.labels[idx])


def compare_detections(ref: Detections, got: Detections, scales: Tensor, half: bool) -> dict:
    """See the module docstring. ``scales``: the batch's ``[B, 2]`` (y, x) resize factors, to
    compare boxes in input pixels. Returns counts, max differences and ``identical`` (float32)
    or ``matched`` (float16, informational)."""
    out = {"reference": int(ref.boxes.shape[0]), "export": int(got.boxes.shape[0])}
    if not half:
        got = untie(ref, got)
        same = out["reference"] == out["export"] and torch.equal(ref.batch_index, got.batch_index) and torch.equal(ref.labels, got.labels)
        if same and out["reference"]:
            s = scales[ref.batch_index][:, [1, 0, 1, 0]]
            ref_in, diff_in = ref.boxes * s, (ref.boxes - got.boxes).abs() * s  # input pixels
            out["max_box_diff"] = float(diff_in.max())
            out["max_score_diff"] = float((ref.scores - got.scores).abs().max())
            same = bool((diff_in <= ATOL * ref_in.abs().clamp(min=1.0)).all()) and out["max_score_diff"] <= ATOL
        out["identical"] = bool(same)
        return out
    if out["reference"] and out["export"]:
        iou = box_iou(ref.boxes, got.boxes)  # [Dr, De]
        iou = iou.masked_fill((ref.batch_index[:, None] != got.batch_index[None]) | (ref.labels[:, None] != got.labels[None]), 0)
        out["matched"] = int((iou.max(dim=1).values >= 0.9).sum())
    else:
        out["matched"] = 0
    return out


def run_checks(model, runtime, reference, images: Tensor, valid: Tensor, scales: Tensor, *, names: list[str],
               post: dict, half: bool, batch_two: bool) -> list[Check]:
    """Compare ``runtime(x)`` with ``reference(x)`` (both: ``[B, 3, H, W]`` -> tuple of
    outputs in ``names`` order) on every image alone and, with ``batch_two``, on the first two
    images together. Detections go through ``model.postprocess(...)`` with ``post``."""

    batches = [[i] for i in range(images.shape[0])]
    checks = []
    for size, group in ((1, batches), (2, [[0, 1]] if batch_two and images.shape[0] >= 2 else [])):
        if not group:
            continue
        diffs = dict.fromkeys(names, 0.0)
        tols = dict.fromkeys(names, RAW_RTOL if not half else ATOL)
        dets = {"reference": 0, "export": 0, ("matched" if half else "identical"): 0 if half else True}
        for idx in group:
            x = images[idx]
            with torch.no_grad():
                ref = [t.float() for t in reference(x)]
                got = [torch.as_tensor(t).float() for t in runtime(x)]
            for name, r, g in zip(names, ref, got):
                if r.shape != g.shape:
                    raise KdctlError(f"verification: output {name} has shape {list(g.shape)} in the export but {list(r.shape)} in PyTorch")
                diffs[name] = max(diffs[name], float((r - g).abs().max()))
                tols[name] = max(tols[name], tolerance(r, half))
            a = model.postprocess(model.raw_from_tuple(ref), valid[idx], scales[idx], **post)
            b = model.postprocess(model.raw_from_tuple(got), valid[idx], scales[idx], **post)
            one = compare_detections(a, b, scales[idx], half)
            for k in ("reference", "export", "matched"):
                if k in one:
                    dets[k] += one[k]
            for k in ("max_box_diff", "max_score_diff"):
                if k in one:
                    dets[k] = max(dets.get(k, 0.0), one[k])
            if not half:
                dets["identical"] = dets["identical"] and one["identical"]
        checks.append(Check(size, diffs, tols, dets))
    return checks


def failure(checks: list[Check], half: bool) -> str | None:
    """One line saying what failed, or None when every check passed."""
    for c in checks:
        bad = [k for k in c.diffs if c.diffs[k] > c.tols[k]]
        if bad:
            worst = max(bad, key=lambda k: c.diffs[k] / c.tols[k])
            return (f"at batch {c.batch}, max |export - pytorch| of {worst} is {c.diffs[worst]:.3g} > {c.tols[worst]:.3g}"
                    f" ({len(bad)} of {len(c.diffs)} outputs over the tolerance)")
        if not half and not c.detections["identical"]:
            d = c.detections
            return (f"at batch {c.batch}, detections differ after postprocess ({d['reference']} from PyTorch, "
                    f"{d['export']} from the export)")
    return None


# ============================================================================= end-to-end graphs
E2E_BOX_ATOL = 1e-3  # px, input pixels (issue: boxes within 1e-3 px, scores within 1e-4)


def _rows(boxes: Tensor, scores: Tensor, labels: Tensor, num: Tensor) -> Detections:
    """End-to-end outputs ``[B, max_det, ...]`` + ``num_detections [B]`` -> flat rows."""
    rank = torch.arange(boxes.shape[1])[None, :]
    b, col = (rank < num[:, None].long()).nonzero(as_tuple=True)
    return Detections(batch_index=b, boxes=boxes[b, col].float(), scores=scores[b, col].float(), labels=labels[b, col].long())


def run_checks_end_to_end(model, runtime, images: Tensor, *, post: dict, batch_two: bool) -> list[Check]:
    """Compare the end-to-end ``runtime`` (uint8 ``images`` ``[B, 3, H, W]`` -> boxes, scores,
    labels, num_detections) with kdctl's own postprocess of the PyTorch ``model`` on the whole
    input (``valid_sizes = (H, W)``, ``scales = 1``: see :mod:`kdctl.export.model_file`), on every
    image alone and, with ``batch_two``, the first two together. Identical: same count, image,
    class and order of every row (ties reordered by :func:`untie`); boxes within :data:`E2E_BOX_ATOL` px,
    scores within ATOL."""
    from kdctl.export.model_file import normalise

    H, W = images.shape[-2:]
    checks = []
    for size, group in ((1, [[i] for i in range(images.shape[0])]), (2, [[0, 1]] if batch_two and images.shape[0] >= 2 else [])):
        if not group:
            continue
        diffs, dets = {"boxes": 0.0, "scores": 0.0}, {"reference": 0, "export": 0, "identical": True}
        for idx in group:
            x = images[idx]
            B = len(idx)
            with torch.no_grad():
                ref = model.postprocess(model(normalise(x, model.mean, model.std)), torch.tensor([[H, W]] * B), torch.ones(B, 2), **post)
                got = untie(ref, _rows(*(torch.as_tensor(t) for t in runtime(x))))
            dets["reference"] += int(ref.labels.numel())
            dets["export"] += int(got.labels.numel())
            same = (ref.labels.numel() == got.labels.numel() and torch.equal(ref.batch_index, got.batch_index)
                    and torch.equal(ref.labels, got.labels))
            if same and ref.labels.numel():
                diffs["boxes"] = max(diffs["boxes"], float((ref.boxes - got.boxes).abs().max()))
                diffs["scores"] = max(diffs["scores"], float((ref.scores - got.scores).abs().max()))
            dets["identical"] = dets["identical"] and same
        dets["max_box_diff"], dets["max_score_diff"] = diffs["boxes"], diffs["scores"]
        checks.append(Check(size, diffs, {"boxes": E2E_BOX_ATOL, "scores": ATOL}, dets))
    return checks
