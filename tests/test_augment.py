"""YOLO-style augmentation (kdctl.data.augment): boxes follow the pixels through mosaic, affine and
rotation; every draw depends on (seed, epoch, index) only; off means today's samples; the last
``close_epochs`` are plain; training with it runs and resumes exactly."""
import colorsys
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kdctl.data.augment as augment_mod
from kdctl.cli import app
from kdctl.data.augment import (AugmentedDataset, affine_matrix, build_augmented, clip_boxes_kept, jitter_hsv,
                                move_boxes, warp_affine)
from kdctl.data.dataset import DetectionDataset, ImageRecord
from kdctl.data.transforms import build_transforms, keep_ratio_size
from kdctl.engine.loader import EpochBatchSampler, SeededDataset, make_loader
from kdctl.engine.trainer import Trainer
from kdctl.recipe import DataConfig, load_recipe

from test_train import TINY, assert_same_weights, tiny, train_losses

GREY = (128, 128, 128)
# box colours: every channel in {0, 85, 170, 255}, so any two differ by >= 85 in some channel
# and each differs from the grey background / fill by >= 43
PALETTE = [(r, g, b) for r in (0, 85, 170, 255) for g in (0, 85, 170, 255) for b in (0, 255)]
SIZES = [(70, 90), (96, 64), (80, 80), (60, 100), (100, 72), (88, 88)]  # (h, w) of each image


class PaintedDataset(DetectionDataset):
    """Grey images with filled rectangles: each box and ignore region has a colour of its own
    (its label indexes ``colours``), so its pixels can be found after augmentation."""

    format = "painted"

    def __init__(self, transforms=None):
        records, self.colours, k = [], [], 0
        for i, (h, w) in enumerate(SIZES):
            # two boxes and one ignore region per image, side by side, never touching
            boxes = np.array([[4 + i, 6, 4 + i + w // 3, 6 + h // 3], [w // 2, h // 2, w - 3, h - 2 - i]], np.float32)
            ignore = np.array([[5, h // 2 + 4, w // 3, h - 5]], np.float32)
            records.append(ImageRecord(i, f"{i}.png", w, h, boxes, np.array([k, k + 1]), ignore, np.array([k + 2])))
            k += 3
        self.colours = PALETTE[:k]
        super().__init__(records, [f"c{j}" for j in range(k)], transforms=transforms)

    def load_image(self, rec: ImageRecord) -> torch.Tensor:
        img = torch.tensor(GREY, dtype=torch.uint8).view(3, 1, 1).repeat(1, rec.height, rec.width)
        for boxes, labels in ((rec.boxes, rec.labels), (rec.ignore, rec.ignore_labels)):
            for (x1, y1, x2, y2), label in zip(boxes.astype(int).tolist(), labels.tolist()):
                img[:, y1:y2, x1:x2] = torch.tensor(self.colours[label], dtype=torch.uint8).view(3, 1, 1)
        return img


def augmented(ds=None, **kw) -> AugmentedDataset:
    args = dict(mosaic=0.5, scale=(0.6, 1.4), translate=0.15, degrees=0.0, hsv=(0.0, 0.0, 0.0), short_side=64,
                max_side=96, fill=GREY, min_size=2.0, min_visible=0.3, post=lambda s: s)
    args.update(kw)
    return AugmentedDataset(ds if ds is not None else PaintedDataset(), **args)


def colour_mask(image: torch.Tensor, colour) -> torch.Tensor:
    """[H, W] True where the pixel is within 12 of ``colour`` in every channel (bilinear edges are not)."""
    return ((image.int() - torch.tensor(colour).view(3, 1, 1)).abs() <= 12).all(0)


def record_matrices(monkeypatch) -> list:
    """The affine matrices kdctl.data.augment builds, in order (to know each sample's scale)."""
    seen, real = [], augment_mod.affine_matrix

    def spy(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(augment_mod, "affine_matrix", spy)
    return seen


# ------------------------------------------------------------------ geometry by hand
def test_affine_matrix_hand_worked():
    m = affine_matrix((100, 200), (50, 100), scale=0.5)  # canvas centre (100, 50) -> output centre (50, 25)
    torch.testing.assert_close(m, torch.tensor([[0.5, 0, 0], [0, 0.5, 0]], dtype=torch.float64))
    m = affine_matrix((10, 10), (10, 10), degrees=90, translate=(0.1, -0.2))
    # 90 degrees counter-clockwise on screen (y down): right of the centre goes up; centre -> (6, 3)
    x, y = (m @ torch.tensor([8.0, 5.0, 1.0], dtype=torch.float64)).tolist()
    assert x == pytest.approx(6.0) and y == pytest.approx(3.0 - 3.0)


def test_move_boxes_encloses_the_moved_corners():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    m = affine_matrix((100, 100), (50, 50), scale=0.5)  # x' = 0.5 x, y' = 0.5 y
    assert move_boxes(boxes, m).tolist() == [[5.0, 10.0, 15.0, 30.0]]
    r = move_boxes(torch.tensor([[-1.0, -1.0, 1.0, 1.0]]) + 5.0, affine_matrix((10, 10), (10, 10), degrees=45))
    half = math.sqrt(2)  # a 2x2 square turned 45 degrees: its enclosing box is 2*sqrt(2) wide
    torch.testing.assert_close(r, torch.tensor([[5 - half, 5 - half, 5 + half, 5 + half]]))


def test_box_rule_clips_and_drops_what_is_mostly_outside():
    whole = torch.tensor([[-30.0, 0.0, 10.0, 10.0], [-5.0, 0.0, 15.0, 10.0], [95.0, 5.0, 120.0, 6.5], [20.0, 20, 20, 30]])
    out, keep = clip_boxes_kept(whole, whole, (100, 100), min_size=2.0, min_visible=0.3)
    assert out.tolist() == [[0, 0, 10, 10], [0, 0, 15, 10], [95, 5, 100, 6.5], [20, 20, 20, 30]]
    # 25% left: dropped; 75%: kept; 1.5 px high: too thin; zero width: empty
    assert keep.tolist() == [False, True, False, False]
    # a box cut by the mosaic canvas border counts against its whole area: 10 of 40 px wide left
    whole, cut = torch.tensor([[0.0, 0.0, 40.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert clip_boxes_kept(whole, cut, (100, 100), min_size=2.0, min_visible=0.3)[1].tolist() == [False]
    assert clip_boxes_kept(whole, cut, (100, 100), min_size=2.0, min_visible=0.25)[1].tolist() == [True]


def test_warp_identity_and_fill_outside():
    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    same = warp_affine(img, affine_matrix((20, 30), (20, 30)), (20, 30), GREY)
    assert torch.equal(same.round().to(torch.uint8), img)
    shifted = warp_affine(img, affine_matrix((20, 30), (20, 30), translate=(0.5, 0.0)), (20, 30), (1, 2, 3))
    assert torch.equal(shifted[:, :, 15:].round().to(torch.uint8), img[:, :, :15])  # moved 15 px right
    assert shifted[:, :, :15].round().tolist() == torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).expand(3, 20, 15).tolist()


def test_warp_matches_a_bilinear_reference():
    """Turned, scaled and shifted, each output pixel centre mapped back and interpolated by hand
    (float64), with the fill colour outside the input."""
    img = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fill = (10.0, 20.0, 30.0)
    m = affine_matrix((17, 23), (15, 19), scale=1.3, degrees=25, translate=(0.1, -0.05))
    out = warp_affine(img, m, (15, 19), fill)
    inv = torch.linalg.inv(torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))
    shifted = img.double() - torch.tensor(fill, dtype=torch.float64).view(3, 1, 1)

    def at(y, x):  # the shifted image, zero outside
        return shifted[:, y, x] if 0 <= y < 17 and 0 <= x < 23 else torch.zeros(3, dtype=torch.float64)

    for i in range(15):
        for j in range(19):
            px, py, _ = (inv @ torch.tensor([j + 0.5, i + 0.5, 1.0], dtype=torch.float64)).tolist()
            x, y = px - 0.5, py - 0.5  # in pixel-centre indices
            x0, y0 = math.floor(x), math.floor(y)
            wx, wy = x - x0, y - y0
            ref = ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x0 + 1))
                   + wy * ((1 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)))
            torch.testing.assert_close(out[:, i, j].double(), ref + torch.tensor(fill, dtype=torch.float64), atol=0.02, rtol=0)


# ------------------------------------------------------------------ colour
@pytest.mark.parametrize("hue, sat, val", [(0.0, 1.0, 1.0), (0.3, 1.4, 0.7), (-0.45, 0.5, 1.6), (0.015, 1.9, 1.3)])
def test_hsv_jitter_matches_colorsys(hue, sat, val):
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 12, 10), generator=g).float()
    img[:, 0, :5] = torch.tensor([[128.0, 128, 128], [255, 0, 0], [0, 0, 0], [0, 255, 0], [10, 10, 200]]).T  # greys, primaries
    img[:, 1, :3] = torch.tensor([[200.0, 200, 50], [50, 200, 200], [200, 50, 200]]).T  # two channels tie for the max
    out = jitter_hsv(img, hue, sat, val)
    expect = []
    for rgb in img.reshape(3, -1).T.tolist():
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
        expect.append([255 * c for c in colorsys.hsv_to_rgb((h + hue) % 1, min(s * sat, 1), min(v * val, 1))])
    torch.testing.assert_close(out.reshape(3, -1).T, torch.tensor(expect, dtype=torch.float32), atol=1e-3, rtol=1e-5)
    if (hue, sat, val) == (0.0, 1.0, 1.0):
        assert torch.equal(out.round(), img)


def test_hsv_gains_act_on_hue_saturation_and_value():
    img = torch.tensor([200.0, 100.0, 50.0]).view(3, 1, 1)  # h (100 - 50) / 150 / 6 = 1/18, s 0.75, v 200/255
    out = jitter_hsv(img, 0.5, 0.5, 0.5).view(3).tolist()
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in out))
    assert (h, s, v) == pytest.approx((1 / 18 + 0.5, 0.375, 100 / 255))


# ------------------------------------------------------------------ boxes follow the pixels
def _check_sample(ds, out, matrix, tiles: list[int]):
    """Every kept box holds its colour's pixels and is filled with them; a dropped box has too
    little left. ``tiles``: the dataset indices in the sample (an image twice is skipped: its
    colours are not unique then)."""
    image = out["image"].as_subclass(torch.Tensor)
    H, W = image.shape[-2:]
    scale = float(matrix[0, 0])
    factors = {}
    for (h, w) in SIZES:
        nh, nw = keep_ratio_size(h, w, 64, 96)
        factors[(h, w)] = (nw / w, nh / h)
    kept = dict(zip(out["labels"].tolist(), out["boxes"].tolist()))
    kept_ignore = dict(zip(out["ignore_labels"].tolist(), out["ignore"].tolist()))
    for i, rec in enumerate(ds.records):
        if i not in tiles:  # none of its colours or boxes
            assert not set(rec.labels.tolist()) & set(kept) and not set(rec.ignore_labels.tolist()) & set(kept_ignore)
            continue
        if tiles.count(i) > 1:
            continue
        fx, fy = factors[(rec.height, rec.width)]
        for boxes, labels, is_ignore in ((rec.boxes, rec.labels, False), (rec.ignore, rec.ignore_labels, True)):
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
                mask = colour_mask(image, ds.colours[label])
                n = int(mask.sum())
                ys, xs = torch.nonzero(mask, as_tuple=True)
                table = kept_ignore if is_ignore else kept
                if label in table:
                    bx1, by1, bx2, by2 = table[label]
                    assert 0 <= bx1 < bx2 <= W and 0 <= by1 < by2 <= H
                    if n:  # every pixel of the colour lies inside its box
                        assert xs.min() >= bx1 - 1 and xs.max() + 1 <= bx2 + 1, (label, table[label])
                        assert ys.min() >= by1 - 1 and ys.max() + 1 <= by2 + 1, (label, table[label])
                    inner = mask[math.ceil(by1 + 2):int(by2 - 2), math.ceil(bx1 + 2):int(bx2 - 2)]
                    assert inner.numel() == 0 or inner.float().mean() > 0.97  # and the box holds that colour
                    if not is_ignore:  # kept: enough of it is left
                        whole = (x2 - x1) * fx * scale * (y2 - y1) * fy * scale
                        assert (bx2 - bx1) * (by2 - by1) >= 0.3 * whole - 1e-3 and min(bx2 - bx1, by2 - by1) >= 2
                elif is_ignore:
                    assert n == 0, label  # an ignore region is dropped only when nothing of it is left
                elif n:
                    whole = (x2 - x1) * fx * scale * (y2 - y1) * fy * scale
                    ext_w, ext_h = int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1
                    # dropped: too little of it left (bilinear edges give a pixel of slack round it)
                    slack = 2 * (ext_w + ext_h) + 4
                    assert n <= 0.3 * whole + slack or min(ext_w, ext_h) <= 2 + 2, (label, n, whole)


@pytest.mark.parametrize("degrees, scale", [(0.0, (0.6, 1.4)), (0.0, (0.45, 0.55)), (20.0, (0.6, 1.4))])
def test_boxes_and_ignore_regions_follow_the_pixels(monkeypatch, degrees, scale):
    """(Scale about 0.5: the whole mosaic canvas is in view, so are boxes cut by its border.)"""
    ds = PaintedDataset()
    aug = augmented(ds, degrees=degrees, scale=scale)
    matrices = record_matrices(monkeypatch)
    tiles, resized = [], aug._resized
    aug._resized = lambda i: (tiles.append(i), resized(i))[1]  # which images a sample is made of
    kinds = set()
    for seed in range(14):
        tiles.clear()
        out = aug.augment(seed % len(ds), torch.Generator().manual_seed(seed))
        mosaic = len(tiles) == 4
        assert tiles[0] == seed % len(ds) and len(tiles) in (1, 4)
        if mosaic:
            assert tuple(out["image"].shape[-2:]) == (64, 64) and out["orig_size"] == (64, 64)
        kinds.add(mosaic)
        assert out["image"].dtype == torch.uint8 and len(out["boxes"]) == len(out["labels"])
        assert tuple(out["boxes"].canvas_size) == tuple(out["image"].shape[-2:])
        if degrees == 0:
            _check_sample(ds, out, matrices[-1], list(tiles))
        else:  # turned boxes are enclosing boxes: each still holds every pixel of its colour
            image = out["image"].as_subclass(torch.Tensor)
            for label, (x1, y1, x2, y2) in zip(out["labels"].tolist(), out["boxes"].tolist()):
                if tiles.count(label // 3) > 1:  # the image is there twice: its colours are not unique
                    continue
                ys, xs = torch.nonzero(colour_mask(image, ds.colours[label]), as_tuple=True)
                assert len(xs) and xs.min() >= x1 - 1 and xs.max() + 1 <= x2 + 1
                assert ys.min() >= y1 - 1 and ys.max() + 1 <= y2 + 1
    assert kinds == {True, False}  # both mosaics and single images were checked


def test_hsv_leaves_the_geometry_alone():
    plain, coloured = augmented(), augmented(hsv=(0.02, 0.7, 0.4))
    for seed in range(4):
        a = plain.augment(seed, torch.Generator().manual_seed(seed))
        b = coloured.augment(seed, torch.Generator().manual_seed(seed))
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
        assert not torch.equal(a["image"], b["image"])


# ------------------------------------------------------------------ determinism, off, close_epochs
def _batches(dataset, epoch: int, start: int = 0, workers: int = 0) -> list:
    sampler = EpochBatchSampler(len(dataset), 3, shuffle=True, seed=5, epoch=epoch, start_batch=start)
    return list(make_loader(dataset, sampler, num_workers=workers, pad_divisor=32))


def _same(a, b) -> bool:
    return all(torch.equal(x.images, y.images) and torch.equal(x.boxes, y.boxes) and torch.equal(x.labels, y.labels)
               for x, y in zip(a, b)) and len(a) == len(b)


def test_samples_depend_only_on_seed_epoch_and_index():
    aug = augmented(mosaic=0.7, degrees=10.0, hsv=(0.02, 0.5, 0.3),
                    post=build_transforms(False, short_side=64, max_side=96).transforms[-1])
    first = _batches(aug, epoch=1)
    torch.manual_seed(123)  # the process RNG outside the sample does not matter
    assert _same(first, _batches(aug, epoch=1))
    assert _same(first[1:], _batches(aug, epoch=1, start=1))  # resume mid-epoch
    assert _same(first, _batches(aug, epoch=1, workers=1))  # in a worker process alike
    assert not _same(first, _batches(aug, epoch=2))
    # one sample alone, by its (index, sample seed), is the one in the batch
    index, seed = next(iter(EpochBatchSampler(len(aug), 3, shuffle=True, seed=5, epoch=1)))[0]
    alone = SeededDataset(aug)[(index, seed)]
    h, w = alone["image"].shape[-2:]
    assert torch.equal(first[0].images[0, :, :h, :w], alone["image"].as_subclass(torch.Tensor))
    # the partners are drawn from the sample's generator: the same seed, the same mosaic
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(aug.augment(2, g1)["image"], aug.augment(2, g2)["image"])


def test_off_by_default_gives_todays_samples(tmp_path):
    assert DataConfig().augment is None
    assert build_augmented(PaintedDataset(), DataConfig(), 12, (0.5,) * 3, (0.2,) * 3) is None
    trainer = Trainer(tiny(), tmp_path / "run", quiet=True)
    assert trainer.augmented is None and trainer.loader.dataset.base is trainer.train_set
    mean, std = trainer.model.mean, trainer.model.std
    plain = PaintedDataset(build_transforms(True, short_side=64, max_side=96, mean=mean, std=std))
    off = PaintedDataset(build_transforms(True, short_side=64, max_side=96, mean=mean, std=std))
    on = augmented(off, post=lambda s: s, off_from_epoch=0)
    assert on.set_epoch(0) is True and on.active is False
    assert _same(_batches(plain, epoch=1), _batches(on, epoch=1))


def test_close_epochs_switches_to_plain_samples():
    cfg = DataConfig(short_side=64, max_side=96, augment={"close_epochs": 2})
    aug = build_augmented(PaintedDataset(build_transforms(True, short_side=64, max_side=96)), cfg, 5, (0.5,) * 3, (0.25,) * 3)
    assert aug.off_from_epoch == 3 and aug.active
    assert [aug.set_epoch(e) for e in range(5)] == [False, False, False, True, False]
    plain = PaintedDataset(build_transforms(True, short_side=64, max_side=96))
    assert _same(_batches(aug, epoch=4), _batches(plain, epoch=4))
    aug.set_epoch(2)
    assert not _same(_batches(aug, epoch=2), _batches(plain, epoch=2))
    assert build_augmented(plain, DataConfig(augment=True), 5, (0.5,) * 3, (0.25,) * 3).off_from_epoch is None


# ------------------------------------------------------------------ training
AUG = ["data.augment.mosaic=0.8", "data.augment.degrees=5", "data.augment.close_epochs=1", "data.num_workers=1"]


def test_training_with_augmentation_switches_off_and_resumes_exactly(tmp_path, monkeypatch):
    recipe = tiny(*AUG)  # 2 epochs x 4 steps, the second plain; a persistent worker
    trainer = Trainer(recipe, tmp_path / "full", quiet=True)
    seen = []
    step = trainer.compute_losses
    monkeypatch.setattr(trainer, "compute_losses", lambda batch: (seen.append(batch), step(batch))[1])
    trainer.fit()
    assert len(seen) == 8
    plain = [b for e in (0, 1) for b in make_loader(trainer.train_set, EpochBatchSampler(
        16, 4, shuffle=True, seed=recipe.train.seed, epoch=e), num_workers=0, pad_divisor=32)]
    assert _same(seen[4:], plain[4:])  # the worker restarted with augmentation off
    assert not any(torch.equal(a.images, b.images) for a, b in zip(seen[:4], plain[:4]))
    Trainer(recipe, tmp_path / "split", quiet=True, max_steps=3).fit()  # stops inside the augmented epoch
    summary = Trainer(recipe, tmp_path / "split", quiet=True, resume=True).fit()
    assert summary["step"] == 8
    assert_same_weights(tmp_path / "full" / "last.safetensors", tmp_path / "split" / "last.safetensors")
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full")


def test_cli_train_with_augmentation_runs(tmp_path):
    sets = [x for s in [*TINY, "data.augment=true", "train.epochs=1"] for x in ("--set", s)]
    res = CliRunner().invoke(app, ["train", "shapes", *sets, "--max-steps", "2", "--out", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["step"] == 2
    plan = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert plan["data"]["augment"]["mosaic"] == 1.0


@pytest.mark.parametrize("name", ["yolo-n", "yolo-s", "yolo-m", "yolo-coco8", "yolo-raccoon"])
def test_yolo_recipes_turn_augmentation_on(name):
    a = load_recipe(name).data.augment
    assert a is not None and a.close_epochs >= 1 and 0 < a.mosaic <= 1
