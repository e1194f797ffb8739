"""The peer side of ``bench_peer.py``: trains and scores one Ultralytics model, as a black box.

Run by ``bench_peer.py`` with the Python of the peer's own virtual environment (Ultralytics is
AGPL and never a kdctl dependency; nothing here reads or copies its source: only its public
``YOLO(...).train / .predict`` API and its documented arguments are used). Reads nothing of
kdctl either, so that it runs where ``import kdctl`` fails.

    python peer_ultralytics.py --train train.json --val val.json --model yolov8n.yaml \\
        --epochs 10 --imgsz 128 --seed 0 --work DIR --out preds.json [--distill-from T.pt]

- ``--train`` / ``--val``: COCO JSON files whose ``file_name`` is relative to the file's folder
  (``kdctl data export-coco`` writes them so); they become a YOLO dataset under ``--work``
  (symlinked images, ``labels/*.txt``, ``data.yaml``);
- trains ``--model`` (a yaml: from scratch) with the settings given (see :data:`MATCHED`);
- predicts the validation images at conf 0.001, IoU 0.7, 100 per image, and writes COCO results
  (``image_id`` and ``category_id`` of ``--val``) to ``--out``, plus ``--out``'s ``.json`` ->
  ``.meta.json`` with the parameter count and the seconds of training.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# the protocol's settings (bench_peer.py's kdctl runs use the same): AdamW at lr 0.002, cosine,
# a linear warm-up over the protocol's steps (Ultralytics' documented minimum is 100 iterations),
# no bias warm-up lr, nbs = the batch (no loss/decay rescaling), hflip 0.5 and no other augmentation
MATCHED = dict(optimizer="AdamW", lr0=0.002, cos_lr=True, warmup_bias_lr=0.0, mosaic=0.0, close_mosaic=0,
               hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, scale=0.0, translate=0.0, degrees=0.0, fliplr=0.5, mixup=0.0,
               cutmix=0.0, copy_paste=0.0, erasing=0.0)


def yolo_dataset(train_json: Path, val_json: Path, root: Path) -> tuple[Path, dict]:
    """A YOLO dataset under ``root`` from two COCO files; returns (data.yaml, {split: {file name:
    (image_id, path)}}) and the contiguous-index -> COCO category id list in the meta."""
    splits, cats = {}, None
    for split, path in (("train", train_json), ("val", val_json)):
        coco = json.loads(path.read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"]) if cats is None else cats
        index = {c["id"]: i for i, c in enumerate(cats)}
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        rows: dict[int, list[str]] = {im["id"]: [] for im in coco["images"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for a in coco["annotations"]:
            if a.get("iscrowd", 0):
                continue
            w, h = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            rows[a["image_id"]].append(f"{index[a['category_id']]} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                                       f"{bw / w:.6f} {bh / h:.6f}")
        files = {}
        for im in coco["images"]:
            src = (path.parent / im["file_name"]).resolve()
            name = f"{im['id']:08d}{src.suffix.lower()}"  # unique, whatever the source folders
            link = root / "images" / split / name
            if not link.exists():
                link.symlink_to(src)
            (root / "labels" / split / f"{im['id']:08d}.txt").write_text("\n".join(rows[im["id"]]) + "\n")
            files[name] = im["id"]
        splits[split] = files
    names = "\n".join(f"  {i}: {c['name']}" for i, c in enumerate(cats))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data, {"splits": splits, "cat_ids": [c["id"] for c in cats]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--val", type=Path, required=True)
    p.add_argument("--model", required=True, help="an Ultralytics model yaml, e.g. yolov8n.yaml")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--imgsz", type=int, required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--distill-from", type=Path, default=None, help="a trained Ultralytics teacher .pt")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE: another train() argument (numbers as such)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch
    from ultralytics import YOLO

    torch.set_num_threads(a.threads)
    data, meta = yolo_dataset(a.train, a.val, a.work / "data")
    steps_per_epoch = -(-len(meta["splits"]["train"]) // a.batch)
    args = dict(MATCHED, data=str(data), epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, nbs=a.batch, seed=a.seed,
                deterministic=True, warmup_epochs=a.warmup_steps / steps_per_epoch, pretrained=False, plots=False,
                amp=False, workers=0, device="cpu", val=False, project=str(a.work), name="train", exist_ok=True,
                verbose=False)
    for item in a.set:
        key, _, value = item.partition("=")
        try:
            args[key] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            args[key] = value
    if a.distill_from is not None:
        args["distill_model"] = str(a.distill_from)
    model = YOLO(a.model)
    epochs: list[float] = []  # seconds of each training epoch (documented callbacks), without setup and validation
    model.add_callback("on_train_epoch_start", lambda trainer: epochs.append(-time.perf_counter()))
    model.add_callback("on_train_epoch_end", lambda trainer: epochs.__setitem__(-1, epochs[-1] + time.perf_counter()))
    start = time.perf_counter()
    model.train(**args)
    seconds = time.perf_counter() - start
    weights = a.work / "train" / "weights" / "last.pt"
    trained = YOLO(str(weights))
    val_dir = a.work / "data" / "images" / "val"
    names = sorted(meta["splits"]["val"])
    results = []
    for i in range(0, len(names), 16):
        chunk = [str(val_dir / n) for n in names[i:i + 16]]
        for name, r in zip(names[i:i + 16], trained.predict(chunk, conf=0.001, iou=0.7, max_det=100, imgsz=a.imgsz,
                                                             device="cpu", verbose=False)):
            xyxy, conf, cls = r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), r.boxes.cls.tolist()
            h, w = r.orig_shape
            for (x1, y1, x2, y2), s, c in zip(xyxy, conf, cls):
                # clipped to the image, and boxes of no width or height dropped: kdctl's own rule
                x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
                y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
                if x2 <= x1 or y2 <= y1:
                    continue
                results.append({"image_id": meta["splits"]["val"][name], "category_id": meta["cat_ids"][int(c)],
                                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                                "score": round(s, 5)})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results))
    params = sum(t.numel() for t in trained.model.parameters())
    a.out.with_suffix(".meta.json").write_text(json.dumps({"params": params, "train_seconds": seconds,
                                                           "epoch_seconds": sum(epochs),
                                                           "steps": steps_per_epoch * a.epochs, "weights": str(weights)}))
    print(f"wrote {a.out}: {len(results)} detections; {params / 1e6:.2f} M parameters; trained in {seconds:.0f} s")


if __name__ == "__main__":
    main()
