"""kdctl.evaluation.box_map: COCO box mAP against the reference numbers and pycocotools used directly."""
from __future__ import annotations

import copy
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from kdctl.errors import DataError, KdctlError
from kdctl.evaluation.box_map import METRIC_NAMES, evaluate, evaluate_data, evaluate_files, load_predictions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIX = DATA / "coco-eval-fixtures"
needs_fixtures = pytest.mark.skipif(
    not FIX.is_dir(), reason=f"real COCO eval fixtures not found at {FIX} (../shared/data/coco-eval-fixtures)"
)
BIG_GT = FIX / "instances_val2014_100.json"
BIG_DT = FIX / "instances_val2014_fakebbox100_results.json"


def direct_pycocotools(gt_file: Path, dt_file: Path) -> list[float]:
    """The reference library used the standard way, from files."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO(str(gt_file))
    coco_dt = coco_gt.loadRes(str(dt_file))
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(v) for v in ev.stats]


# ----------------------------------------------------------------------- real fixtures
@pytest.fixture(scope="module")
def big_result():
    return evaluate_files(BIG_GT, BIG_DT, per_class=True, backend="pycocotools")


@needs_fixtures
@pytest.mark.parametrize("name", METRIC_NAMES)
def test_reproduces_reference_cocoeval_numbers(big_result, name):
    expected = json.loads((FIX / "expected.json").read_text())["expected_bbox_stats"]
    assert big_result["metrics"][name] == pytest.approx(expected[name], abs=1e-4)


@needs_fixtures
def test_big_fixture_counts_and_backend(big_result):
    assert big_result["backend"] == "pycocotools"
    assert big_result["num_images"] == 100
    assert big_result["num_predictions"] == len(json.loads(BIG_DT.read_text()))
    assert list(big_result["metrics"]) == list(METRIC_NAMES)


@needs_fixtures
def test_per_class_mean_is_ap(big_result):
    gt = json.loads(BIG_GT.read_text())
    per_class = big_result["per_class"]
    assert list(per_class) == [c["name"] for c in gt["categories"]]
    with_gt = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0)}
    names_with_gt = {c["name"] for c in gt["categories"] if c["id"] in with_gt}
    assert {n for n, ap in per_class.items() if ap is not None} == names_with_gt  # None = no ground truth
    values = [ap for ap in per_class.values() if ap is not None]
    assert all(0.0 <= ap <= 1.0 for ap in values)
    assert float(np.mean(values)) == pytest.approx(big_result["metrics"]["AP"], abs=1e-6)


@needs_fixtures
def test_small_pair_matches_pycocotools_direct():
    gt, dt = FIX / "gt_dataset.json", FIX / "dt_dataset.json"
    ours = evaluate_files(gt, dt, backend="pycocotools")["metrics"]
    assert [ours[n] for n in METRIC_NAMES] == pytest.approx(direct_pycocotools(gt, dt), abs=1e-12)


@needs_fixtures
def test_ignore_crowd_pair_matches_pycocotools_direct(tmp_path):
    gt_file, dt_file = FIX / "gt_ignore_test.json", FIX / "dt_ignore_test.json"
    # The image id there is the string "2299" while the detections (and most boxes) use 2299:
    # pycocotools alone refuses the pair. kdctl reads digit strings as integers, as
    # faster-coco-eval does; compare with pycocotools run directly on the integer-id copy.
    with pytest.raises(AssertionError):
        direct_pycocotools(gt_file, dt_file)
    gt = json.loads(gt_file.read_text())
    for img in gt["images"]:
        img["id"] = int(img["id"])
    for ann in gt["annotations"]:
        ann["image_id"] = int(ann["image_id"])
    fixed = tmp_path / "gt_int_ids.json"
    fixed.write_text(json.dumps(gt))

    result = evaluate_files(gt_file, dt_file, per_class=True, backend="pycocotools")
    ours = [result["metrics"][n] for n in METRIC_NAMES]
    assert ours == pytest.approx(direct_pycocotools(fixed, dt_file), abs=1e-12)
    # faster-coco-eval's published numbers for this pair (tests/test_basic.py, test_ignore_coco_eval).
    published = {"AP": 0.7099009900990099, "AP50": 1.0, "AP75": 0.8415841584158416, "APs": -1.0,
                 "APm": 0.7099009900990099, "APl": -1.0, "AR1": 0.0, "AR10": 0.45384615384615384,
                 "AR100": 0.7153846153846154, "ARs": -1.0, "ARm": 0.7153846153846154, "ARl": -1.0}
    assert result["metrics"] == pytest.approx(published, abs=1e-12)
    assert result["per_class"] == {"person": pytest.approx(published["AP"], abs=1e-12)}


@needs_fixtures
def test_evaluate_data_uses_a_coco_json_as_written(big_result):
    """The official numbers need the file's own areas (segmentation areas): the JSON is not
    re-exported through DetectionDataset.to_coco(), whose areas are box areas."""
    assert evaluate_data(str(BIG_GT), BIG_DT, per_class=True, backend="pycocotools") == big_result


@pytest.mark.skipif(not (DATA / "coco8").is_dir(), reason=f"coco8 not found at {DATA / 'coco8'}")
def test_evaluate_data_other_formats_go_through_to_coco(tmp_path):
    from kdctl.data import open_dataset

    ds = open_dataset(str(DATA / "coco8"), "val", check_images=False)
    preds = [{"image_id": r.image_id, "category_id": ds.cat_ids[int(c)], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0}
             for r in ds.records for (x1, y1, x2, y2), c in zip(r.boxes.tolist(), r.labels.tolist())]
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(preds))
    result = evaluate_data(str(DATA / "coco8"), path, split="val")
    assert result["metrics"]["AP"] == pytest.approx(1.0) and result["num_images"] == len(ds)
    path.write_text(json.dumps([dict(preds[0], image_id=123456789)]))
    with pytest.raises(DataError, match=r"preds.json: 1 of 1 predictions use image ids .*\(e.g. 123456789\)"):
        evaluate_data(str(DATA / "coco8"), path, split="val")


# ----------------------------------------------------------------------- hand-made cases
def make_gt() -> dict:
    """Three images, two categories, one small, one medium and two large boxes, one crowd region."""
    anns = [
        (1, 1, [10, 10, 20, 20], 0),  # small
        (1, 2, [100, 100, 120, 120], 0),  # large
        (2, 1, [30, 40, 50, 50], 0),  # medium
        (3, 2, [0, 0, 150, 100], 0),  # large
        (3, 1, [200, 150, 80, 80], 1),  # crowd: neither rewarded nor penalised
    ]
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 240} for i in (1, 2, 3)],
        "annotations": [{"id": n + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": cr}
                        for n, (im, c, b, cr) in enumerate(anns)],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def perfect(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in gt["annotations"] if not a["iscrowd"]]


def test_perfect_predictions_score_one():
    result = evaluate(make_gt(), perfect(make_gt()), per_class=True)
    assert result["metrics"] == pytest.approx({n: 1.0 for n in METRIC_NAMES})
    assert result["per_class"] == pytest.approx({"cat": 1.0, "dog": 1.0})
    assert result["num_images"] == 3 and result["num_predictions"] == 4


def test_detection_on_crowd_region_is_ignored_and_a_false_positive_is_not():
    gt = make_gt()
    hits = [dict(p, score=0.5) for p in perfect(gt)]  # ranked below the extra detection
    on_crowd = {"image_id": 3, "category_id": 1, "bbox": [205, 155, 40, 40], "score": 0.99}
    assert evaluate(gt, hits + [on_crowd])["metrics"]["AP"] == pytest.approx(1.0)
    elsewhere = dict(on_crowd, image_id=2)
    assert evaluate(gt, hits + [elsewhere])["metrics"]["AP"] < 1.0


def test_empty_predictions_give_zeros(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    assert load_predictions(path) == []
    result = evaluate(make_gt(), [], per_class=True, backend="auto")
    assert result["metrics"] == {n: 0.0 for n in METRIC_NAMES}
    assert result["per_class"] == {"cat": 0.0, "dog": 0.0}
    assert result["num_predictions"] == 0


def test_digit_string_ids_and_numpy_values_are_accepted():
    gt = make_gt()
    preds = [dict(p, image_id=str(p["image_id"]), bbox=np.asarray(p["bbox"], np.float32), score=np.float32(1))
             for p in perfect(gt)]
    assert evaluate(gt, preds)["metrics"]["AP"] == pytest.approx(1.0)


def test_inputs_are_not_modified_and_nothing_is_printed(capsys):
    gt, preds = make_gt(), perfect(make_gt())
    gt_before, preds_before = copy.deepcopy(gt), copy.deepcopy(preds)
    evaluate(gt, preds, per_class=True)
    assert gt == gt_before and preds == preds_before
    assert capsys.readouterr().out == ""


def test_to_coco_ground_truth_round_trip():
    from kdctl.data.dataset import DetectionDataset, ImageRecord

    rec = ImageRecord(
        image_id=7, file_name="a.jpg", width=200, height=100,
        boxes=np.array([[10, 10, 60, 50], [100, 20, 190, 90]], np.float32), labels=np.array([0, 1]),
        ignore=np.array([[0, 60, 40, 100]], np.float32), ignore_labels=np.array([0]),
    )
    gt = DetectionDataset([rec], ["a", "b"]).to_coco()
    preds = [{"image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 40], "score": 0.9},
             {"image_id": 7, "category_id": 2, "bbox": [100, 20, 90, 70], "score": 0.8},
             {"image_id": 7, "category_id": 1, "bbox": [2, 62, 30, 30], "score": 0.95}]  # inside the ignore region
    assert evaluate(gt, preds)["metrics"]["AP"] == pytest.approx(1.0)


# ----------------------------------------------------------------------- errors
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preds.json"
    path.write_text(text)
    return path


GOOD = {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}


@pytest.mark.parametrize(("content", "needle"), [
    ('[\n{"image_id": 1,,}\n]', "preds.json:2: not valid JSON"),
    ('{"annotations": []}', "not a list"),
    (json.dumps([GOOD, {k: v for k, v in GOOD.items() if k != "score"}]), "entry 1: missing key(s) score"),
    (json.dumps([dict(GOOD, bbox=[1, 2, 3])]), "entry 0: bbox"),
    (json.dumps([dict(GOOD, bbox=[1, 2, "3", 4])]), "must be 4 finite numbers"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, NaN, 4], "score": 0.5}]', "must be 4 finite numbers"),
    (json.dumps([dict(GOOD, bbox=[10, 10, 5, -4])]), "negative width or height"),
    (json.dumps([dict(GOOD, score="high")]), "score 'high' must be a finite number"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": Infinity}]', "must be a finite number"),
    (json.dumps([dict(GOOD, image_id=[1])]), "image_id: [1] is not an id"),
    (json.dumps([5]), "entry 0: is a int, not an object"),
])
def test_bad_prediction_files_name_the_file(tmp_path, content, needle):
    path = write(tmp_path, content)
    with pytest.raises(DataError) as exc:
        load_predictions(path)
    assert str(path) in str(exc.value) and needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_ground_truth_file_given_as_predictions_gets_a_hint(tmp_path):
    with pytest.raises(DataError, match="looks like a ground-truth file"):
        load_predictions(write(tmp_path, json.dumps(make_gt())))


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_predictions(tmp_path / "nope.json")
    with pytest.raises(DataError, match="nope_gt.json: file not found"):
        evaluate_files(tmp_path / "nope_gt.json", write(tmp_path, "[]"))


@pytest.mark.parametrize(("field", "value", "what"), [("image_id", 999, "image"), ("category_id", 42, "category")])
def test_unknown_ids(tmp_path, field, value, what):
    gt = make_gt()
    preds = perfect(gt) + [dict(GOOD, **{field: value}), dict(GOOD, **{field: value})]
    with pytest.raises(KdctlError, match=rf"2 of 6 predictions use {what} ids that are not in the ground truth \(e.g. {value}\)"):
        evaluate(gt, preds)
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    pred_file = write(tmp_path, json.dumps(preds))
    with pytest.raises(DataError) as exc:
        evaluate_files(gt_file, pred_file)
    msg = str(exc.value)
    assert msg.startswith(f"{pred_file}: ") and "dataset's image ids and category ids" in msg and str(gt_file) in msg


def test_bad_ground_truth(tmp_path):
    gt_file = tmp_path / "gt.json"
    gt_file.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"gt.json:1: not valid JSON"):
        evaluate_files(gt_file, write(tmp_path, "[]"))
    gt_file.write_text('{"images": []}')
    with pytest.raises(DataError, match=r"gt.json: ground truth is not a COCO dict"):
        evaluate_files(gt_file, write(tmp_path, "[]"))
    bad = make_gt()
    del bad["annotations"][2]["bbox"]
    with pytest.raises(KdctlError, match=r"annotations\[2\] has no 'bbox'"):
        evaluate(bad, [])


def test_bad_prediction_in_memory_and_unknown_backend():
    with pytest.raises(KdctlError, match="prediction 0: bbox"):
        evaluate(make_gt(), [dict(GOOD, bbox=[0, 0, math.inf, 1])])
    with pytest.raises(KdctlError, match="unknown evaluation backend 'detectron'"):
        evaluate(make_gt(), perfect(make_gt()), backend="detectron")


def test_forced_faster_coco_eval_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails as if not installed
    with pytest.raises(KdctlError, match="faster-coco-eval package is not installed"):
        evaluate(make_gt(), perfect(make_gt()), backend="faster_coco_eval")
    assert evaluate(make_gt(), perfect(make_gt()), backend="auto")["backend"] == "pycocotools"


@needs_fixtures
def test_faster_coco_eval_branch_wiring(monkeypatch, big_result):
    """faster-coco-eval is not installed here: a stand-in with its documented signatures
    (COCO(dict), loadRes(list), COCOeval_faster(gt, dt, iouType, print_function=...)) backed
    by pycocotools checks that the branch calls it that way and reads its results."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    class FakeCOCO(COCO):
        def __init__(self, annotation_file=None, use_deepcopy=False, print_function=print):
            super().__init__()
            assert isinstance(annotation_file, dict)
            self.dataset = annotation_file
            self.createIndex()

    class FakeEval(COCOeval):
        def __init__(self, cocoGt=None, cocoDt=None, iouType="segm", print_function=print, **kw):
            assert iouType == "bbox" and callable(print_function)
            super().__init__(cocoGt, cocoDt, iouType)

    fake = types.ModuleType("faster_coco_eval")
    fake.COCO, fake.COCOeval_faster = FakeCOCO, FakeEval
    monkeypatch.setitem(sys.modules, "faster_coco_eval", fake)
    result = evaluate_files(BIG_GT, BIG_DT, per_class=True)
    assert result["backend"] == "faster_coco_eval"
    assert result["metrics"] == big_result["metrics"] and result["per_class"] == big_result["per_class"]
