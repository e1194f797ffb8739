"""Sample transforms (keep-ratio resize, flip, normalise) and batch collation."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torchvision import tv_tensors

from kdctl.data.collate import Batch, collate
from kdctl.data.transforms import build_transforms, keep_ratio_size

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_sample(h: int, w: int, boxes, ignore=(), image_id: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    ignore = torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4)
    return {
        "image": tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)),
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.arange(len(boxes), dtype=torch.long),
        "ignore": tv_tensors.BoundingBoxes(ignore, format="XYXY", canvas_size=(h, w)),
        "ignore_labels": torch.full((len(ignore),), 2, dtype=torch.long),
        "image_id": image_id,
        "orig_size": (h, w),
    }


def normalise(img_uint8: torch.Tensor) -> torch.Tensor:
    m, s = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (img_uint8.float() / 255.0 - m) / s


# ------------------------------------------------------------------ transforms
def test_keep_ratio_size_rule():
    assert keep_ratio_size(300, 400, 600, 1000) == (600, 800)  # short side binds: scale 2
    assert keep_ratio_size(300, 900, 600, 1000) == (333, 1000)  # long side binds: scale 10/9
    assert keep_ratio_size(1333, 800, 800, 1333) == (1333, 800)  # already there


def test_resize_short_side_moves_boxes_exactly():
    s = make_sample(300, 400, [[40.0, 30.0, 120.0, 90.0]], ignore=[[10.0, 20.0, 50.0, 60.0]])
    out = build_transforms(False, short_side=600, max_side=1000)(s)
    assert tuple(out["image"].shape) == (3, 600, 800)
    assert out["boxes"].tolist() == [[80.0, 60.0, 240.0, 180.0]]
    assert out["ignore"].tolist() == [[20.0, 40.0, 100.0, 120.0]]
    assert tuple(out["boxes"].canvas_size) == (600, 800)


def test_resize_max_side_binds():
    s = make_sample(300, 900, [[90.0, 30.0, 180.0, 150.0]], ignore=[[0.0, 0.0, 900.0, 300.0]])
    out = build_transforms(False, short_side=600, max_side=1000)(s)
    assert tuple(out["image"].shape) == (3, 333, 1000)
    sx, sy = 1000 / 900, 333 / 300
    expect = torch.tensor([[90.0 * sx, 30.0 * sy, 180.0 * sx, 150.0 * sy]])
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), expect)
    torch.testing.assert_close(out["ignore"].as_subclass(torch.Tensor), torch.tensor([[0.0, 0.0, 1000.0, 333.0]]))


def test_flip_mirrors_boxes_and_pixels():
    s = make_sample(300, 400, [[40.0, 30.0, 120.0, 90.0], [0.0, 0.0, 10.0, 10.0]], ignore=[[300.0, 5.0, 400.0, 25.0]])
    img = s["image"].clone()
    out = build_transforms(True, short_side=300, max_side=1000, hflip=1.0)(s)  # scale 1: flip only
    assert tuple(out["image"].shape) == (3, 300, 400)
    assert out["boxes"].tolist() == [[280.0, 30.0, 360.0, 90.0], [390.0, 0.0, 400.0, 10.0]]
    assert out["ignore"].tolist() == [[0.0, 5.0, 100.0, 25.0]]
    torch.testing.assert_close(out["image"].as_subclass(torch.Tensor), normalise(img).flip(-1))


def test_no_flip_in_eval_or_with_p0():
    for train, p in ((False, 1.0), (True, 0.0)):
        s = make_sample(300, 400, [[40.0, 30.0, 120.0, 90.0]])
        out = build_transforms(train, short_side=300, max_side=1000, hflip=p)(s)
        assert out["boxes"].tolist() == [[40.0, 30.0, 120.0, 90.0]]


def test_normalisation_formula():
    s = make_sample(32, 48, [[1.0, 2.0, 3.0, 4.0]])
    img = s["image"].clone()
    out = build_transforms(False, short_side=32, max_side=100, mean=MEAN, std=STD)(s)
    assert out["image"].dtype == torch.float32
    for c, y, x in ((0, 0, 0), (1, 10, 20), (2, 31, 47)):
        expect = (img[c, y, x].item() / 255.0 - MEAN[c]) / STD[c]
        assert out["image"][c, y, x].item() == pytest.approx(expect, abs=1e-5)


def test_other_keys_pass_through():
    s = make_sample(300, 400, [[40.0, 30.0, 120.0, 90.0]], ignore=[[1.0, 1.0, 9.0, 9.0]], image_id=42)
    out = build_transforms(True, short_side=600, max_side=1000)(s)
    assert set(out) == set(s)
    assert out["orig_size"] == (300, 400) and out["image_id"] == 42
    assert out["labels"].tolist() == [0] and out["ignore_labels"].tolist() == [2]
    assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.long


def test_empty_boxes_survive():
    s = make_sample(300, 400, [], ignore=[])
    out = build_transforms(True, short_side=600, max_side=1000, hflip=1.0)(s)
    assert tuple(out["boxes"].shape) == (0, 4) and tuple(out["ignore"].shape) == (0, 4)


# ------------------------------------------------------------------ collate
def _resized(h, w, boxes, ignore, orig, image_id):
    s = make_sample(h, w, boxes, ignore, image_id=image_id)
    s["image"] = tv_tensors.Image(s["image"].float())
    s["orig_size"] = orig
    return s


def test_collate_pads_and_masks():
    a = _resized(50, 70, [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], [], orig=(100, 140), image_id=3)
    b = _resized(64, 33, [], [[0.0, 0.0, 10.0, 10.0]], orig=(64, 33), image_id=9)
    batch = collate([a, b], pad_divisor=32)
    assert isinstance(batch, Batch) and len(batch) == 2
    assert tuple(batch.images.shape) == (2, 3, 64, 96) and batch.images.dtype == torch.float32
    assert torch.equal(batch.images[0, :, :50, :70], a["image"].as_subclass(torch.Tensor))
    assert batch.images[0, :, 50:].abs().sum() == 0 and batch.images[0, :, :, 70:].abs().sum() == 0
    assert torch.equal(batch.images[1, :, :64, :33], b["image"].as_subclass(torch.Tensor))
    assert batch.valid_sizes.tolist() == [[50, 70], [64, 33]]
    assert tuple(batch.boxes.shape) == (2, 2, 4) and batch.boxes.dtype == torch.float32
    assert batch.boxes[0].tolist() == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    assert batch.boxes[1].abs().sum() == 0
    assert batch.labels.tolist() == [[0, 1], [-1, -1]]
    assert batch.gt_mask.tolist() == [[True, True], [False, False]]
    assert tuple(batch.ignore.shape) == (2, 1, 4)
    assert batch.ignore[1].tolist() == [[0.0, 0.0, 10.0, 10.0]]
    assert batch.ignore_labels.tolist() == [[-1], [2]]
    assert batch.ignore_mask.tolist() == [[False], [True]]
    assert batch.image_ids.tolist() == [3, 9]
    assert batch.orig_sizes.tolist() == [[100, 140], [64, 33]]
    torch.testing.assert_close(batch.scales, torch.tensor([[0.5, 0.5], [1.0, 1.0]]))
    assert batch.scales.dtype == torch.float32
    for t in (batch.boxes, batch.ignore, batch.images):
        assert type(t) is torch.Tensor  # no tv_tensor subclasses leak into the batch


def test_collate_no_boxes_at_all_keeps_one_slot():
    a = _resized(32, 32, [], [], orig=(32, 32), image_id=0)
    batch = collate([a, a], pad_divisor=32)
    assert tuple(batch.boxes.shape) == (2, 1, 4) and tuple(batch.ignore.shape) == (2, 1, 4)
    assert batch.labels.tolist() == [[-1], [-1]] and not batch.gt_mask.any() and not batch.ignore_mask.any()
    assert tuple(batch.images.shape) == (2, 3, 32, 32)


def test_batch_to_and_pin_memory():
    batch = collate([_resized(20, 30, [[1.0, 1.0, 5.0, 5.0]], [], orig=(40, 60), image_id=1)], pad_divisor=32)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.boxes, batch.boxes)
    if torch.cuda.is_available():
        assert batch.pin_memory().images.is_pinned()
        assert batch.to("cuda", non_blocking=True).labels.device.type == "cuda"


def test_dataloader_end_to_end_with_shapes():
    from kdctl.data.shapes import ShapesDataset

    ds = ShapesDataset(num_images=4, image_size=96, seed=0, transforms=build_transforms(True, short_side=128, max_side=200))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=partial(collate, pad_divisor=32))
    batch = next(iter(loader))
    assert tuple(batch.images.shape) == (4, 3, 128, 128)
    assert batch.valid_sizes.tolist() == [[128, 128]] * 4
    n = [len(r.boxes) for r in ds.records]
    assert batch.gt_mask.sum(1).tolist() == n
    torch.testing.assert_close(batch.scales, torch.full((4, 2), 128 / 96))
    # Boxes map back to the original frame by dividing by the scale.
    back = batch.boxes[0, : n[0]] / batch.scales[0].flip(0).repeat(2)
    expect = torch.from_numpy(ds.records[0].boxes)
    flipped = torch.stack([96 - expect[:, 2], expect[:, 1], 96 - expect[:, 0], expect[:, 3]], 1)
    assert torch.allclose(back, expect, atol=1e-3) or torch.allclose(back, flipped, atol=1e-3)


def test_fused_float_normalize_equals_torchvision_stock_ops():
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from kdctl.data.transforms import ToFloatNormalize

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = tv_tensors.Image(torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8))
    stock = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])(img)
    ours = ToFloatNormalize(mean, std)(img)
    assert isinstance(ours, tv_tensors.Image) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), format="XYXY", canvas_size=(37, 53))
    assert torch.equal(ToFloatNormalize(mean, std)({"image": img, "boxes": boxes})["boxes"], boxes)
