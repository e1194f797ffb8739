"""What ``kdctl predict`` writes, and where.

Layout of the output folder::

    predictions.json      per image name: boxes (xyxy, original pixels), scores, class names
    drawn/<name>          each image with its boxes, class names and scores drawn
    images/<name>         with --save-labels: the image itself (copied, or written for frames)
    labels/<name>.txt     with --save-labels: YOLO ``class cx cy w h`` (normalised), one line a box
    data.yaml             with --save-labels: ``path: .``, ``train``/``val``: images, ``names``

so that, with ``--save-labels``, the folder is a YOLO dataset that ``kdctl train`` /
``kdctl distill`` read (``data.format: yolo``, ``data.path: OUT/data.yaml``).

The folder: without ``--out``, ``runs/predict``, else ``runs/predict-2``, ``-3`` ... (the
first that does not exist); an explicit ``--out`` that exists (and is not empty) is refused
unless ``--force``, which replaces it only when ``kdctl predict`` wrote it (it holds a
``predictions.json``). Nothing is ever overwritten silently.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from kdctl.data.yolo import IMAGE_SUFFIXES, label_path
from kdctl.artifact.checkpoint import atomic_write_bytes
from kdctl.errors import KdctlError

PREDICTIONS = "predictions.json"
DEFAULT_OUT = Path("runs") / "predict"
# 20 colours that stay apart on photos (tab20 order, dark and light interleaved), by class index
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229),
]


def output_folder(out: Path | None, force: bool) -> tuple[Path, str]:
    """The folder to write into and how it was chosen: ``"new"``, ``"numbered"`` (the default
    ``runs/predict`` was taken) or ``"replaced"`` (``--force`` on an earlier predict folder).
    The folder is not created here. KdctlError when ``out`` exists and cannot be used."""
    if out is None:
        folder, k = DEFAULT_OUT, 1
        while folder.exists():
            k += 1
            folder = DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-{k}")
        return folder, "new" if k == 1 else "numbered"
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out, "new"
    if not out.is_dir():
        raise KdctlError(f"--out {out}: is a file; give a folder (a new one, or omit --out for runs/predict-N)")
    if not force:
        raise KdctlError(f"--out {out}: the folder exists; add --force to replace it, choose another --out, "
                         "or omit --out for a new numbered runs/predict-N")
    if not (out / PREDICTIONS).is_file():
        raise KdctlError(f"--out {out}: the folder exists and kdctl predict did not write it (no {PREDICTIONS}); "
                         "--force replaces only predict folders: choose another --out")
    return out, "replaced"


def _font() -> str | None:
    """A TrueType font file for the labels (matplotlib's DejaVu Sans), or None: PIL's small bitmap font."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    except (ImportError, ValueError):
        return None


def draw(image: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
         names: list[str]) -> torch.Tensor:
    """uint8 ``[3, h, w]`` with ``boxes`` ``[n, 4]`` (xyxy, its pixels) drawn in a colour per
    class and labelled ``name score``; line width and font grow with the image."""
    from torchvision.utils import draw_bounding_boxes

    if len(boxes) == 0:
        return image
    h, w = int(image.shape[-2]), int(image.shape[-1])
    side = min(h, w)
    font = _font()
    text = [f"{names[c]} {s:.2f}" for c, s in zip(labels.tolist(), scores.tolist())]
    colours = [PALETTE[c % len(PALETTE)] for c in labels.tolist()]
    return draw_bounding_boxes(image, boxes.round(), labels=text, colors=colours, width=max(1, round(side / 320)),
                               font=font, font_size=max(10, round(side / 40)) if font else None,
                               fill_labels=True, label_colors="white")  # white text on the box colour


def save_image(image: torch.Tensor, path: Path) -> None:
    """uint8 ``[3, h, w]`` as a JPEG (quality 92) or PNG, by ``path``'s suffix."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    if path.suffix.lower() in (".jpg", ".jpeg"):
        pil.save(path, quality=92)
    else:
        pil.save(path)


def viewable(name: str) -> str:
    """``name`` with a suffix an image viewer opens (.jpg, .jpeg or .png kept; others -> .png)."""
    p = Path(name)
    return name if p.suffix.lower() in (".jpg", ".jpeg", ".png") else p.with_suffix(".png").as_posix()


def yolo_lines(boxes: torch.Tensor, labels: torch.Tensor, width: int, height: int) -> str:
    """YOLO label text for ``boxes`` ``[n, 4]`` xyxy in original pixels: ``class cx cy w h``
    normalised to [0, 1] after clipping to the image; boxes under 1 px after clipping are left out."""
    b = boxes.double().clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
    b, cls = b[keep], labels[keep]
    size = torch.tensor([width, height], dtype=torch.float64)
    centre = (b[:, :2] + b[:, 2:]) / 2 / size
    wh = (b[:, 2:] - b[:, :2]) / size
    rows = torch.cat([centre, wh], dim=1).tolist()
    return "".join(f"{c} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, (x, y, bw, bh) in zip(cls.tolist(), rows))


class PredictionWriter:
    """Writes one image's outputs at a time (:meth:`add`) and the summary files at the end
    (:meth:`close`). ``names``: the class names that ``labels`` index."""

    def __init__(self, folder: Path, names: list[str], *, replace: bool, save_labels: bool):
        self.folder, self.names, self.save_labels, self.replace = folder, list(names), save_labels, replace
        self.records: dict[str, dict] = {}
        self.started = False

    def _start(self) -> None:
        """Make the folder at the first image, so that a run that reads nothing writes nothing."""
        if self.replace:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started = True

    def add(self, item: dict, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """One image: ``item`` from :class:`~kdctl.data.collate.ImageBatch` ``.items``;
        ``boxes`` float ``[n, 4]`` xyxy original pixels, ``scores`` ``[n]``, ``labels`` ``[n]`` (CPU)."""
        if not self.started:
            self._start()
        name, original = item["name"], item["original"]
        h, w = int(original.shape[-2]), int(original.shape[-1])
        self.records[name] = {
            "source": item["source"], **({"frame": item["frame"]} if item["frame"] is not None else {}),
            "width": w, "height": h,
            "boxes": [[round(v, 3) for v in row] for row in boxes.tolist()],
            "scores": [round(s, 5) for s in scores.tolist()],
            "classes": [self.names[c] for c in labels.tolist()],
        }
        save_image(draw(original, boxes, scores, labels, self.names), self.folder / "drawn" / viewable(name))
        if self.save_labels:
            self._save_sample(item, name, original, boxes, labels)

    def _save_sample(self, item: dict, name: str, original: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> None:
        src = Path(item["source"])
        if item["frame"] is None and src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES:
            target = self.folder / "images" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        else:  # a video frame, or a generated image: write the pixels
            target = self.folder / "images" / viewable(name)
            save_image(original, target)
        label = label_path(target)  # the reader's rule, also for names with an "images" folder in them
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(yolo_lines(boxes, labels, int(original.shape[-1]), int(original.shape[-2])))

    def close(self, meta: dict) -> dict:
        """Write ``predictions.json`` (``meta`` + ``images``) and, with labels, ``data.yaml``.
        Returns the paths written."""
        import json

        written = {"predictions": str(self.folder / PREDICTIONS), "drawn": str(self.folder / "drawn")}
        # one line per image keeps the file readable and diffable
        head = json.dumps({**meta, "classes": self.names}, indent=1)[:-2]
        rows = ",\n".join(f"  {json.dumps(n)}: {json.dumps(r)}" for n, r in self.records.items())
        text = f'{head},\n "images": {{\n{rows}\n }}\n}}\n' if rows else f'{head},\n "images": {{}}\n}}\n'
        atomic_write_bytes(self.folder / PREDICTIONS, text.encode())
        if self.save_labels:
            text = (f"# pseudo-labels written by kdctl predict from {meta.get('model')} (score >= {meta.get('conf')})\n"
                    + yaml.safe_dump({"path": ".", "train": "images", "val": "images",
                                      "names": dict(enumerate(self.names))}, sort_keys=False))
            atomic_write_bytes(self.folder / "data.yaml", text.encode())
            written["data_yaml"] = str(self.folder / "data.yaml")
        return written


def per_image(batch_index: torch.Tensor, count: int) -> list[np.ndarray]:
    """Row indices of each of ``count`` images in a flat detection list (rows grouped by image,
    best first within each, as :class:`~kdctl.models.postprocess.Detections` keeps them)."""
    order = batch_index.cpu().numpy()
    return [np.flatnonzero(order == b) for b in range(count)]
