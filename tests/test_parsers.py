"""COCO / YOLO / VOC parsers on the real data in ../shared/data and on hand-made bad files."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from kdctl.data.coco import CocoDataset
from kdctl.data.voc import VocDataset
from kdctl.data.yolo import YoloDataset
from kdctl.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name!r} not found at {path} (see shared/data/README.md)")
    return path


def check_sample(ds, idx: int) -> dict:
    """The documented sample dict, with sizes matching the record."""
    rec, s = ds.records[idx], ds[idx]
    assert isinstance(s["image"], tv_tensors.Image) and s["image"].dtype == torch.uint8
    assert tuple(s["image"].shape) == (3, rec.height, rec.width)
    assert isinstance(s["boxes"], tv_tensors.BoundingBoxes) and s["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(s["boxes"].canvas_size) == (rec.height, rec.width)
    assert s["labels"].dtype == torch.int64 and s["labels"].shape == (len(rec.boxes),)
    assert s["ignore_labels"].dtype == torch.int64 and s["ignore"].shape == (len(rec.ignore), 4)
    assert s["image_id"] == rec.image_id and s["orig_size"] == (rec.height, rec.width)
    return s


# ---------------------------------------------------------------------------------- YOLO: coco8
def read_yolo_labels(path: Path) -> np.ndarray:
    rows = [list(map(float, ln.split())) for ln in path.read_text().splitlines() if ln.strip()]
    return np.asarray(rows, np.float64).reshape(-1, 5)


def test_coco8_splits_counts_and_ids():
    root = shared("coco8")
    train, val = YoloDataset(root / "data.yaml", "train"), YoloDataset(root / "data.yaml", "val")
    both = YoloDataset(root / "data.yaml", split=None)
    assert (len(train), len(val), len(both)) == (4, 4, 8)
    assert len(train.classes) == 80 and train.classes[0] == "person" and train.cat_ids[:2] == [1, 2]
    total = 0
    for ds in (train, val):
        for rec in ds.records:
            assert rec.image_id == int(Path(rec.file_name).stem)  # numeric COCO stems
            expected = read_yolo_labels(root / "labels" / Path(rec.file_name).parent.name / f"{Path(rec.file_name).stem}.txt")
            assert len(rec.boxes) == len(expected), rec.file_name
            assert rec.labels.tolist() == expected[:, 0].astype(int).tolist()
            total += len(rec.boxes)
    assert total == 30
    assert sum(len(r.boxes) for r in both.records) == 30
    assert sorted(r.image_id for r in both.records) == sorted(r.image_id for r in train.records + val.records)
    assert train.report.skipped == [] and train.report.degenerate == 0


def test_coco8_boxes_denormalised_by_hand():
    root = shared("coco8")
    ds = YoloDataset(root / "data.yaml", "train")
    rec = next(r for r in ds.records if r.image_id == 9)
    w, h = Image.open(root / "images/train/000000000009.jpg").size
    assert (rec.width, rec.height) == (w, h) == (640, 480)
    # first line of labels/train/000000000009.txt: "45 0.479492 0.688771 0.955609 0.5955"
    cx, cy, bw, bh = 0.479492 * 640, 0.688771 * 480, 0.955609 * 640, 0.5955 * 480
    expected = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
    np.testing.assert_allclose(rec.boxes[0], expected, atol=1e-3)
    assert rec.labels[0] == 45 and ds.classes[45] == "bowl"


def test_coco8_getitem():
    ds = YoloDataset(shared("coco8") / "data.yaml", "val")
    s = check_sample(ds, 0)
    assert torch.equal(s["boxes"].as_subclass(torch.Tensor), torch.from_numpy(ds.records[0].boxes))


# ---------------------------------------------------------------------------------- VOC: raccoon
def csv_filenames(path: Path) -> set[str]:
    with path.open(newline="") as fh:
        return {row["filename"] for row in csv.DictReader(fh)}


def test_raccoon_all_and_splits():
    root = shared("raccoon-voc")
    ds = VocDataset(root)
    assert len(ds) == 200 and sum(len(r.boxes) for r in ds.records) == 217
    assert ds.classes == ["raccoon"] and ds.report.skipped == []
    assert sorted(r.image_id for r in ds.records) == list(range(200))
    for split in ("train", "test"):
        sub = VocDataset(root, split)
        names = csv_filenames(root / "splits" / f"{split}_labels.csv")
        assert len(sub) == len(names) and {r.file_name for r in sub.records} == names
    with pytest.raises(DataError, match="unknown split 'nope'.*train"):
        VocDataset(root, "nope")


def test_raccoon_one_box_by_hand_and_getitem():
    ds = VocDataset(shared("raccoon-voc"))
    idx = next(i for i, r in enumerate(ds.records) if r.file_name == "raccoon-1.jpg")
    rec = ds.records[idx]
    assert (rec.width, rec.height) == (650, 417)
    assert rec.boxes.tolist() == [[81, 88, 522, 408]] and rec.labels.tolist() == [0]
    s = check_sample(ds, idx)
    assert s["boxes"].tolist() == [[81, 88, 522, 408]]


# ---------------------------------------------------------------------------------- COCO fixtures
def test_coco_fixture_ids_crowd_and_empty_images(tmp_path):
    path = shared("coco-eval-fixtures") / "instances_val2014_100.json"
    raw = json.loads(path.read_text())
    ds = CocoDataset(path, check_images=False)
    assert len(ds) == 100 and [r.image_id for r in ds.records] == [im["id"] for im in raw["images"]]
    ids = sorted(c["id"] for c in raw["categories"])
    assert ds.cat_ids == ids and ids[-1] == 90 and len(ids) == 80  # non-contiguous
    name_of = {c["id"]: c["name"] for c in raw["categories"]}
    for label, cid in enumerate(ds.cat_ids):
        assert ds.label_of_cat[cid] == label and ds.classes[label] == name_of[cid]
    crowd = [a for a in raw["annotations"] if a["iscrowd"]]
    assert len(crowd) > 0
    assert sum(len(r.ignore) for r in ds.records) == len(crowd)
    assert sum(len(r.boxes) for r in ds.records) == len(raw["annotations"]) - len(crowd)
    # one annotation checked: xywh -> xyxy, category id -> label
    ann = next(a for a in raw["annotations"] if not a["iscrowd"])
    rec = next(r for r in ds.records if r.image_id == ann["image_id"])
    x, y, w, h = ann["bbox"]
    hit = np.abs(rec.boxes - np.array([x, y, x + w, y + h], np.float32)).max(axis=1) < 1e-3
    assert hit.any() and ds.cat_ids[rec.labels[hit][0]] == ann["category_id"]
    c = crowd[0]
    rec = next(r for r in ds.records if r.image_id == c["image_id"])
    assert ds.cat_ids[rec.ignore_labels[0]] in {a["category_id"] for a in crowd if a["image_id"] == c["image_id"]}
    # The fixture has no image without annotations; add one and check it is kept.
    raw["images"].append({"id": 999999, "file_name": "empty.jpg", "width": 10, "height": 10})
    extra = tmp_path / "with_empty.json"
    extra.write_text(json.dumps(raw))
    ds2 = CocoDataset(extra, check_images=False)
    assert len(ds2) == 101 and len(ds2.records[-1].boxes) == 0 and ds2.records[-1].image_id == 999999


def test_coco_to_coco_round_trip(tmp_path):
    ds = CocoDataset(shared("coco-eval-fixtures") / "instances_val2014_100.json", check_images=False)
    out = tmp_path / "gt.json"
    out.write_text(json.dumps(ds.to_coco()))
    again = CocoDataset(out, check_images=False)
    assert again.cat_ids == ds.cat_ids and again.classes == ds.classes and len(again) == len(ds)
    for a, b in zip(ds.records, again.records):
        assert (a.image_id, a.file_name, a.width, a.height) == (b.image_id, b.file_name, b.width, b.height)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
        np.testing.assert_allclose(a.ignore, b.ignore, atol=1e-4)
        assert a.labels.tolist() == b.labels.tolist() and a.ignore_labels.tolist() == b.ignore_labels.tolist()


# ---------------------------------------------------------------------------------- bad inputs
def write_jpg(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def coco_json(tmp_path: Path, anns: list, images=None) -> Path:
    images = images or [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                        {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}))
    return path


def test_coco_bad_inputs(tmp_path):
    write_jpg(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg at all")
    path = coco_json(tmp_path, [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 10], "iscrowd": 0}])
    with pytest.raises(DataError, match=r"b\.jpg: cannot read image"):
        CocoDataset(path)
    ds = CocoDataset(path, skip_bad=True)
    assert [r.image_id for r in ds.records] == [1] and ds.records[0].labels.tolist() == [1]
    assert len(ds.report.skipped) == 1 and ds.report.skipped[0][0].endswith("b.jpg")
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"b\.jpg: image file not found"):
        CocoDataset(path)
    assert len(CocoDataset(path, check_images=False)) == 2  # images not touched

    for ann, msg in [({"id": 5, "image_id": 1, "category_id": 4, "bbox": [0, 0, 5, 5]}, "annotation id 5.*category_id 4"),
                     ({"id": 6, "image_id": 9, "category_id": 3, "bbox": [0, 0, 5, 5]}, "annotation id 6.*image_id 9"),
                     ({"id": 8, "image_id": 2, "category_id": 3, "bbox": [0, 0, 5]}, "annotation id 8.*bbox")]:
        path = coco_json(tmp_path, [ann])
        with pytest.raises(DataError, match=r"ann\.json: " + msg):
            CocoDataset(path, check_images=False)
        ds = CocoDataset(path, check_images=False, skip_bad=True)
        assert len(ds.report.skipped) == 1 and msg.split(".*")[0] in ds.report.skipped[0][1]
        assert len(ds) == (2 if ann["image_id"] == 9 else 1)

    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [],\n "annotations": [,]}')
    for skip in (False, True):
        with pytest.raises(DataError, match=r"broken\.json:2: invalid JSON"):
            CocoDataset(bad, skip_bad=skip)
    bad.write_text('{"images": []}')
    with pytest.raises(DataError, match=r"broken\.json: missing.*annotations"):
        CocoDataset(bad)


def make_yolo(tmp_path: Path, labels: dict[str, str], garbage: tuple = ()) -> Path:
    for stem, text in labels.items():
        if stem in garbage:
            (tmp_path / "images/train").mkdir(parents=True, exist_ok=True)
            (tmp_path / f"images/train/{stem}.jpg").write_bytes(b"\x00garbage")
        else:
            write_jpg(tmp_path / f"images/train/{stem}.jpg", (100, 50))
        (tmp_path / "labels/train").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"labels/train/{stem}.txt").write_text(text)
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [a, b]\n")
    return tmp_path / "data.yaml"


@pytest.mark.parametrize("line, msg", [("0 0.5 0.5 0.2", "expected 5 numbers"), ("0 0.5 x 0.2 0.2", "expected 5 numbers"),
                                       ("2 0.5 0.5 0.2 0.2", "class id 2"), ("1.5 0.5 0.5 0.2 0.2", "class id 1.5")])
def test_yolo_bad_label_lines(tmp_path, line, msg):
    yaml = make_yolo(tmp_path, {"good": "0 0.5 0.5 0.2 0.2\n", "bad": f"1 0.5 0.5 0.2 0.2\n\n{line}\n"})
    with pytest.raises(DataError, match=rf"bad\.txt:3: {msg}"):
        YoloDataset(yaml)
    ds = YoloDataset(yaml, skip_bad=True)
    assert [Path(r.file_name).stem for r in ds.records] == ["good"]
    assert ds.report.skipped[0][0].endswith("bad.txt") and ds.report.skipped[0][1].startswith("line 3:")


def test_yolo_bad_images_and_yaml(tmp_path):
    yaml = make_yolo(tmp_path, {"good": "", "junk": "0 0.5 0.5 0.2 0.2\n"}, garbage=("junk",))
    with pytest.raises(DataError, match=r"junk\.jpg: cannot read image"):
        YoloDataset(yaml)
    ds = YoloDataset(yaml, skip_bad=True)
    assert len(ds) == 1 and ds.report.skipped[0][0].endswith("junk.jpg")
    assert ds.records[0].image_id == 0 and len(ds.records[0].boxes) == 0  # non-numeric stems -> sorted index
    (tmp_path / "list.txt").write_text("images/train/good.jpg\nimages/train/missing.jpg\n")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: list.txt\nnames: {0: a, 1: b}\n")
    with pytest.raises(DataError, match=r"missing\.jpg: image file not found"):
        YoloDataset(yaml)
    assert len(YoloDataset(yaml, skip_bad=True)) == 1
    with pytest.raises(DataError, match=r"data\.yaml: key 'val' is missing"):
        YoloDataset(yaml, "val")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\n")
    with pytest.raises(DataError, match=r"data\.yaml: key 'names'"):
        YoloDataset(yaml)
    with pytest.raises(DataError, match=r"nowhere\.yaml: data\.yaml not found"):
        YoloDataset(tmp_path / "nowhere.yaml")


def test_yolo_clip_and_degenerate(tmp_path):
    # image 100x50: box 1 spills over the right edge, box 2 has zero width
    yaml = make_yolo(tmp_path, {"7": "0 0.9 0.5 0.4 0.2\n1 0.5 0.5 0.0 0.2\n0 0.5 0.5 0.2 0.2\n"})
    ds = YoloDataset(yaml)
    rec = ds.records[0]
    assert rec.image_id == 7 and rec.labels.tolist() == [0, 0]
    np.testing.assert_allclose(rec.boxes, [[70, 20, 100, 30], [40, 20, 60, 30]], atol=1e-4)
    assert (ds.report.clipped, ds.report.degenerate) == (1, 1)


VOC_XML = """<annotation><filename>{img}</filename><size><width>64</width><height>48</height></size>
<object><name>cat</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>4</ymin><xmax>{x2}</xmax><ymax>20</ymax></bndbox></object>
<object><name>dog</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
</annotation>"""


def make_voc(tmp_path: Path, **xmls: str) -> Path:
    (tmp_path / "annotations").mkdir(exist_ok=True)
    for stem, text in xmls.items():
        write_jpg(tmp_path / "images" / f"{stem}.jpg")
        (tmp_path / "annotations" / f"{stem}.xml").write_text(text)
    return tmp_path


def test_voc_difficult_clip_degenerate(tmp_path):
    root = make_voc(tmp_path, a=VOC_XML.format(img="a.jpg", x1=50, x2=80), b=VOC_XML.format(img="b.jpg", x1=5, x2=5))
    ds = VocDataset(root)
    assert ds.classes == ["cat", "dog"]
    a, b = ds.records
    assert a.boxes.tolist() == [[50, 4, 64, 20]] and a.labels.tolist() == [0]
    assert a.ignore.tolist() == [[1, 1, 9, 9]] and a.ignore_labels.tolist() == [1]
    assert len(b.boxes) == 0 and len(b.ignore) == 1
    assert (ds.report.clipped, ds.report.degenerate) == (1, 1)
    assert VocDataset(root, classes=["dog", "cat", "bird"]).records[0].labels.tolist() == [1]
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "mine.txt").write_text("b\n")
    assert [r.file_name for r in VocDataset(root, "mine").records] == ["b.jpg"]
    assert [r.file_name for r in VocDataset(root, str(tmp_path / "splits" / "mine.txt")).records] == ["b.jpg"]


@pytest.mark.parametrize("text, msg", [
    ("<annotation><filename>bad.jpg</filename>\n<object><name>cat</name></oops>", r"bad\.xml:2: malformed XML"),
    (VOC_XML.format(img="bad.jpg", x1="ten", x2=20), r"bad\.xml: object #1 \(cat\): <xmin> is 'ten'"),
    (VOC_XML.format(img="bad.jpg", x1="", x2=20), r"bad\.xml: object #1 \(cat\): <bndbox> lacks xmin"),
    (VOC_XML.format(img="gone.jpg", x1=1, x2=20), r"gone\.jpg: image file not found"),
])
def test_voc_bad_files(tmp_path, text, msg):
    root = make_voc(tmp_path, good=VOC_XML.format(img="good.jpg", x1=1, x2=20), bad=text)
    with pytest.raises(DataError, match=msg):
        VocDataset(root)
    ds = VocDataset(root, skip_bad=True)
    assert [r.file_name for r in ds.records] == ["good.jpg"] and len(ds.report.skipped) == 1


def test_voc_unreadable_image_and_unknown_class(tmp_path):
    root = make_voc(tmp_path, good=VOC_XML.format(img="good.jpg", x1=1, x2=20), bad=VOC_XML.format(img="bad.jpg", x1=1, x2=20))
    (tmp_path / "images" / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(DataError, match=r"bad\.jpg: cannot read image"):
        VocDataset(root)
    assert VocDataset(root, skip_bad=True).report.skipped[0][0].endswith("bad.jpg")
    shutil.copy(tmp_path / "images" / "good.jpg", tmp_path / "images" / "bad.jpg")
    with pytest.raises(DataError, match=r"bad\.xml: object name\(s\) \['dog'\] not in the given classes"):
        VocDataset(root, classes=["cat"])
    ds = VocDataset(root, classes=["cat"], skip_bad=True)
    assert len(ds) == 0 and len(ds.report.skipped) == 2


def test_coco_clip_degenerate_string_ids(tmp_path):
    anns = [{"id": 1, "image_id": "1", "category_id": 3, "bbox": [50, 10, 30, 10]},  # spills right: clipped
            {"id": 2, "image_id": "1", "category_id": 7, "bbox": [5, 5, 0, 10]},  # zero width: dropped
            {"id": 3, "image_id": "1", "category_id": 7, "bbox": [0, 0, 70, 48], "iscrowd": 1}]  # clipped ignore
    path = coco_json(tmp_path, anns, images=[{"id": "1", "file_name": "a.jpg", "width": 64, "height": 48}])
    ds = CocoDataset(path, check_images=False)
    rec = ds.records[0]
    assert rec.image_id == 1 and rec.boxes.tolist() == [[50, 10, 64, 20]] and rec.labels.tolist() == [0]
    assert rec.ignore.tolist() == [[0, 0, 64, 48]] and rec.ignore_labels.tolist() == [1]
    assert (ds.report.clipped, ds.report.degenerate) == (2, 1)


def test_yolo_all_splits_deduplicated(tmp_path):
    yaml = make_yolo(tmp_path, {"1": "0 0.5 0.5 0.2 0.2\n", "2": ""})
    yaml.write_text("path: .\ntrain: images/train\nval: [images/train, images/train/1.jpg.txt]\nnames: [a, b]\n")
    (tmp_path / "images/train/1.jpg.txt").write_text("./1.jpg\n")  # a list file, relative to its folder
    ds = YoloDataset(yaml, split=None)
    assert [r.file_name for r in ds.records] == ["images/train/1.jpg", "images/train/2.jpg"]
    assert [r.image_id for r in ds.records] == [1, 2] and [len(r.boxes) for r in ds.records] == [1, 0]


def test_voc_size_fallback_and_mismatch(tmp_path):
    no_size = VOC_XML.format(img="a.jpg", x1=1, x2=20).replace("<size><width>64</width><height>48</height></size>", "")
    root = make_voc(tmp_path, a=no_size)
    rec = VocDataset(root).records[0]
    assert (rec.width, rec.height) == (64, 48)
    (tmp_path / "annotations" / "a.xml").write_text(no_size.replace("</filename>", "</filename><size><width>10</width><height>48</height></size>"))
    with pytest.raises(DataError, match=r"a\.xml: <size> says 10x48 but a\.jpg is 64x48"):
        VocDataset(root)
