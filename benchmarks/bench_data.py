"""Data-pipeline and evaluation throughput, each against a peer measured in the same run.

1. Loading: kdctl's CocoDataset + v2 transforms + collate against torchvision's
   ``CocoDetection`` wrapped for transforms v2 with the same resize and flip and torchvision's
   stock ToDtype + Normalize, padded and stacked, on the same COCO export of ``shapes`` (PNG
   files, 256 px upscaled to 512), single process, same threads.
2. ``shapes`` rendering speed (images generated per second; no peer: it replaces disk reads).
3. Evaluation: ``kdctl.evaluation.box_map.evaluate`` against pycocotools used directly (COCO(file) +
   loadRes + evaluate/accumulate/summarize) on the shared 100-image fixture.

Run: ``.venv/bin/python benchmarks/bench_data.py [--images 256] [--repeats 3]``
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from kdctl.data import build_dataset
from kdctl.data.coco import CocoDataset
from kdctl.data.collate import collate
from kdctl.data.export import export_coco
from kdctl.data.transforms import build_transforms
from kdctl.recipe import DataConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_loading(n: int, repeats: int, batch: int) -> dict:
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    from torchvision.transforms import v2

    cfg = DataConfig(format="shapes", shapes={"val_images": n, "image_size": 256})
    tfm = build_transforms(True, short_side=512, max_side=512, hflip=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(tmp) / "shapes.json"
        export_coco(build_dataset(cfg, "val"), ann)
        ours = CocoDataset(ann, transforms=tfm)
        # The peer is torchvision's stock pipeline: PIL -> ToImage, the same keep-ratio resize and
        # flip, then stock ToDtype + Normalize (kdctl fuses those two into one allocation).
        peer_tfm = v2.Compose([v2.ToImage(), *tfm.transforms[:2], v2.ToDtype(torch.float32, scale=True),
                               v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
        peer = wrap_dataset_for_transforms_v2(CocoDetection(str(ann.parent), str(ann), transforms=peer_tfm), target_keys=("boxes", "labels", "image_id"))

        def run_ours():
            for start in range(0, n, batch):
                collate([ours[i] for i in range(start, min(n, start + batch))])

        def run_peer():
            for start in range(0, n, batch):
                items = [peer[i] for i in range(start, min(n, start + batch))]
                torch.stack([torch.nn.functional.pad(img, (0, 512 - img.shape[-1], 0, 512 - img.shape[-2])) for img, _ in items])

        with contextlib.redirect_stdout(io.StringIO()):
            t_ours, t_peer = best_of(run_ours, repeats), best_of(run_peer, repeats)
    return {"kdctl_img_s": n / t_ours, "torchvision_img_s": n / t_peer, "ratio": t_peer / t_ours}


def bench_shapes(n: int, repeats: int) -> dict:
    ds = build_dataset(DataConfig(format="shapes", shapes={"val_images": n, "image_size": 256}), "val")
    t = best_of(lambda: [ds.load_image(r) for r in ds.records], repeats)
    return {"img_s": n / t, "ms_per_image": 1000 * t / n}


def bench_eval(repeats: int) -> dict | None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from kdctl.evaluation.box_map import evaluate, load_predictions

    fx = SHARED / "coco-eval-fixtures"
    if not fx.is_dir():
        return None
    gt_file, dt_file = fx / "instances_val2014_100.json", fx / "instances_val2014_fakebbox100_results.json"

    def direct():
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(gt_file))
            ev = COCOeval(gt, gt.loadRes(str(dt_file)), "bbox")
            ev.evaluate(), ev.accumulate(), ev.summarize()

    def ours():
        evaluate(json.loads(gt_file.read_text()), load_predictions(dt_file))

    t_direct, t_ours = best_of(direct, repeats), best_of(ours, repeats)
    return {"kdctl_s": t_ours, "pycocotools_s": t_direct, "overhead": t_ours / t_direct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, {args.images} images, best of {args.repeats}")
    load = bench_loading(args.images, args.repeats, args.batch)
    print(f"loading+transforms+collate  kdctl {load['kdctl_img_s']:.1f} img/s   torchvision CocoDetection+v2 {load['torchvision_img_s']:.1f} img/s   ratio {load['ratio']:.2f}x")
    shapes = bench_shapes(args.images, args.repeats)
    print(f"shapes rendering (256 px)   {shapes['img_s']:.1f} img/s ({shapes['ms_per_image']:.2f} ms/image)")
    ev = bench_eval(args.repeats)
    if ev is None:
        print("evaluation: ../shared/data/coco-eval-fixtures absent, skipped")
    else:
        print(f"COCO eval, 100-image fixture  kdctl {ev['kdctl_s'] * 1000:.0f} ms   pycocotools direct {ev['pycocotools_s'] * 1000:.0f} ms   overhead {ev['overhead']:.2f}x")


if __name__ == "__main__":
    main()
