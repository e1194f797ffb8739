"""Datasets: build one from a recipe's ``data`` section or from a ``DATA`` argument.

``DATA`` on the command line is one of: ``shapes`` (the built-in procedural set), a COCO
``.json``, a YOLO ``data.yaml``, a Pascal VOC folder, or a recipe (built-in name or file),
whose ``data`` section is used.
"""
from __future__ import annotations

from pathlib import Path

from kdctl.data.dataset import DetectionDataset, ImageRecord, LoadReport
from kdctl.errors import KdctlError, load_yaml, read_text
from kdctl.recipe import DataConfig, builtin_recipes, load_recipe
from kdctl.recipe.files import is_data_yaml

__all__ = ["DetectionDataset", "ImageRecord", "LoadReport", "build_dataset", "data_config", "data_config_from_arg", "open_dataset"]


def build_dataset(cfg: DataConfig, split: str | None = "train", *, transforms=None, check_images: bool | str = True,
                  require_images: bool = True) -> DetectionDataset:
    """The dataset a recipe's ``data`` section describes. ``split`` is ``"train"``, ``"val"``
    or ``None`` (every image the source has; for COCO and shapes, the train part).
    ``check_images`` (COCO only): True, False or ``"auto"`` (see :class:`CocoDataset`).
    ``require_images``: a ``"train"`` / ``"val"`` split without images (or classes) is a
    KdctlError (False: only the class list is wanted).

    Split names map through ``data.train_split`` / ``data.val_split`` (YOLO, VOC) and
    ``data.path`` / ``data.val_path`` (COCO)."""
    if split not in ("train", "val", None):
        raise KdctlError(f"split must be 'train' or 'val', got {split!r}")
    common = {"skip_bad": cfg.skip_bad, "min_box_size": cfg.min_box_size, "transforms": transforms}
    if cfg.format == "shapes":
        from kdctl.data.shapes import ShapesDataset

        s = cfg.shapes
        val = split == "val"
        # Train and val draw from disjoint seed streams: seed*2 and seed*2+1.
        return ShapesDataset(
            num_images=s.val_images if val else s.train_images, image_size=s.image_size, num_classes=s.num_classes,
            seed=s.seed * 2 + int(val), min_objects=s.min_objects, max_objects=s.max_objects, transforms=transforms,
        )
    if cfg.format == "coco":
        from kdctl.data.coco import CocoDataset

        ann, root = (cfg.val_path, cfg.val_image_root) if split == "val" else (cfg.path, cfg.image_root)
        if ann is None:
            raise KdctlError("data.val_path is not set: give the COCO JSON of the validation images")
        ds = CocoDataset(ann, root, check_images=check_images, **common)
    elif cfg.format == "yolo":
        from kdctl.data.yolo import YoloDataset

        ds = YoloDataset(cfg.path, _split_name(cfg, split), **common)
    else:
        from kdctl.data.voc import VocDataset

        ds = VocDataset(cfg.path, _split_name(cfg, split), classes=cfg.classes, **common)
    if not require_images or split is None:
        return ds
    if len(ds) == 0:  # nothing to train on or to score: say so, not a crash later
        skipped = len(ds.report.skipped)
        why = f"all {skipped} were skipped as unreadable (data.skip_bad)" if skipped else "it lists no images"
        raise KdctlError(f"{ds.source}: the {split} split has no images ({why}); check data.path and the split names")
    if not ds.classes:
        raise KdctlError(f"{ds.source}: the dataset has no classes; add categories / names / labelled objects")
    return ds


def _split_name(cfg: DataConfig, split: str | None) -> str | None:
    return None if split is None else (cfg.val_split if split == "val" else cfg.train_split)


def data_config_from_arg(spec: str, *, skip_bad: bool = False) -> DataConfig:
    """Turn a ``DATA`` argument into a :class:`DataConfig`, guessing the format from the path."""
    if spec == "shapes":
        return DataConfig(format="shapes", skip_bad=skip_bad)
    path = Path(spec)
    if not path.exists():
        if spec in builtin_recipes():
            return _recipe_data(spec, skip_bad)
        raise KdctlError(
            f"{spec}: no such file or folder; DATA is 'shapes', a COCO .json, a YOLO data.yaml, a VOC folder or a recipe"
        )
    if path.is_dir():
        if (path / "data.yaml").is_file():
            return DataConfig(format="yolo", path=str(path / "data.yaml"), skip_bad=skip_bad)
        if (path / "annotations").is_dir() or (path / "Annotations").is_dir():
            return DataConfig(format="voc", path=str(path), skip_bad=skip_bad, val_split=_voc_val_split(path))
        raise KdctlError(f"{spec}: folder is neither a VOC dataset (no annotations/ or Annotations/) nor a YOLO one (no data.yaml)")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return DataConfig(format="coco", path=str(path), val_path=str(path), skip_bad=skip_bad)
    if suffix in (".yaml", ".yml"):
        raw = load_yaml(read_text(path, "YAML file"), path)
        if is_data_yaml(raw):
            return DataConfig(format="yolo", path=str(path), skip_bad=skip_bad)
        return _recipe_data(str(path), skip_bad)
    raise KdctlError(f"{spec}: cannot tell the dataset format from the name; give a COCO .json, a YOLO data.yaml, a VOC folder or a recipe")


def data_config(spec: str | None, default: DataConfig, *, skip_bad: bool = False) -> DataConfig:
    """The data of a command: its ``DATA`` argument, or ``default`` (the recipe's) when None;
    ``skip_bad`` (``--skip-bad``) adds to the recipe's ``data.skip_bad``."""
    if spec is not None:
        return data_config_from_arg(spec, skip_bad=skip_bad)
    return default.model_copy(update={"skip_bad": True}) if skip_bad else default


def _recipe_data(name: str, skip_bad: bool) -> DataConfig:
    cfg = load_recipe(name).data
    return cfg.model_copy(update={"skip_bad": cfg.skip_bad or skip_bad})


def _voc_val_split(root: Path) -> str:
    """VOC sets call their held-out list ``val`` or ``test``; use whichever exists."""
    for name in ("val", "test"):
        for cand in (f"ImageSets/Main/{name}.txt", f"splits/{name}.txt", f"splits/{name}_labels.csv", f"splits/{name}.csv"):
            if (root / cand).is_file():
                return name
    return "val"


def open_dataset(spec: str, split: str | None = None, *, skip_bad: bool = False, check_images: bool | str = True, transforms=None) -> DetectionDataset:
    """``build_dataset(data_config_from_arg(spec), split)``: the CLI's way in."""
    cfg = data_config_from_arg(spec, skip_bad=skip_bad)
    return build_dataset(cfg, split, transforms=transforms, check_images=check_images)
