"""Write any dataset as COCO JSON; generated datasets (shapes) also get their images as PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path

from kdctl.data.dataset import DetectionDataset
from kdctl.artifact.rundir import atomic_path, atomic_write_bytes, check_writable_target
from kdctl.errors import KdctlError, os_problem
from kdctl.progressbar import track


def image_targets(dataset: DetectionDataset, out_dir: str | Path) -> list[Path]:
    """Where :func:`write_images` writes each image: ``out_dir/<file_name>``."""
    return [Path(out_dir) / rec.file_name for rec in dataset.records]


def check_image_targets(targets: list[Path], force: bool) -> None:
    """Refuse, before anything is written, images that would replace existing files (without
    ``force``) or land where a file blocks a folder."""
    taken = [p for p in targets if p.exists() or p.is_symlink()]
    if taken and not force:
        raise KdctlError(f"{taken[0]}: already exists ({len(taken)} of the {len(targets)} images to write do); "
                         "pass --force to overwrite them or choose another OUT")
    folders = {p.parent for p in targets}
    for folder in sorted(folders):
        for f in (folder, *folder.parents):
            if f.exists():
                if not f.is_dir():
                    raise KdctlError(f"{f}: is a file where the images' folder {folder} should be; "
                                     "move it or choose another OUT")
                break
    for p in taken:
        if p.is_dir():
            raise KdctlError(f"{p}: is a folder where an image should be written; move it or choose another OUT")


def write_images(dataset: DetectionDataset, out_dir: str | Path, progress: str | None = None) -> None:
    """Write every image of ``dataset`` as PNG ``out_dir/<file_name>`` (creates folders), each
    through a temporary file and a rename; ``progress`` is the label of a progress bar."""
    from PIL import Image

    out = Path(out_dir)
    records = track(dataset.records, progress, total=len(dataset)) if progress else dataset.records
    for rec in records:
        path = out / rec.file_name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KdctlError(f"{path.parent}: cannot create the images' folder: {os_problem(exc)}") from None
        with atomic_path(path, durable=False) as tmp:
            Image.fromarray(dataset.load_image(rec).permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def select_classes(coco: dict, classes: list[str], source: str) -> dict:
    """A COCO dict keeping only the categories named in ``classes``, in that order (new ids
    1..n); annotations of other classes are dropped. KdctlError naming an unknown class."""
    by_name = {c["name"]: c["id"] for c in coco["categories"]}
    unknown = [n for n in classes if n not in by_name]
    if unknown or len(set(classes)) != len(classes):
        what = f"unknown class {unknown[0]!r}" if unknown else "a class is named twice"
        raise KdctlError(f"--classes: {what}; {source} has {', '.join(by_name)}")
    new_id = {by_name[n]: i + 1 for i, n in enumerate(classes)}
    anns = [{**a, "id": k + 1, "category_id": new_id[a["category_id"]]}
            for k, a in enumerate(x for x in coco["annotations"] if x["category_id"] in new_id)]
    cats = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(classes)]
    return {**coco, "annotations": anns, "categories": cats}


def export_coco(ds: DetectionDataset, out_path: str | Path, classes: list[str] | None = None, *,
                force: bool = False) -> dict:
    """Write ``ds`` as a COCO JSON file at ``out_path``; ``classes``: keep only these classes,
    in this order (:func:`select_classes`), e.g. to make a smaller dataset with its own order.

    ``file_name`` of each image is relative to the JSON's folder, so the file loads back with
    ``kdctl data stats OUT``. Images that exist on disk are referenced where they are; images
    without a file (shapes) are rendered into ``<OUT stem>/`` next to the JSON as PNG. Existing
    files (the JSON or any image) are replaced only with ``force``; that is checked before
    anything is written. Every file is written atomically, the JSON last. Returns counts and
    the image folder (if any).
    """
    out_path = Path(out_path)
    folder = out_path.parent
    check_writable_target(out_path, force)
    generated = any(rec.path is None for rec in ds.records)
    image_dir = folder / out_path.stem if generated else None
    if image_dir is not None:
        check_image_targets(image_targets(ds, image_dir), force)
    coco = ds.to_coco()
    if classes:
        coco = select_classes(coco, classes, ds.source)
    if not folder.exists():
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise KdctlError(f"{folder}: cannot create output folder: {os_problem(exc)}") from None
    if image_dir is not None:
        write_images(ds, image_dir, progress=f"writing {len(ds)} images")
    by_id = {img["id"]: img for img in coco["images"]}
    for rec in ds.records:
        target = image_dir / rec.file_name if rec.path is None else rec.path
        by_id[rec.image_id]["file_name"] = os.path.relpath(Path(target).resolve(), folder.resolve())
    atomic_write_bytes(out_path, json.dumps(coco).encode())
    return {
        "images": len(coco["images"]), "annotations": len(coco["annotations"]),
        "categories": len(coco["categories"]), "image_dir": str(image_dir) if image_dir else None,
    }
