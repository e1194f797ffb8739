"""The CLI through Typer's test runner: help, JSON output, exit code 2 with one line."""
import json

import pytest
import yaml
from typer.testing import CliRunner

from kdctl.cli import app
from conftest import shared

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("cmd", [[], ["eval"], ["train"], ["distill"], ["compare"], ["export"], ["fetch"], ["analyze-conflict"],
                                 ["recipes", "list"], ["recipes", "show"], ["recipes", "validate"], ["recipes", "families"],
                                 ["data", "stats"], ["data", "export-coco"]])
def test_every_command_has_help_with_an_example(cmd):
    result = run(*cmd, "--help")
    assert result.exit_code == 0, result.output
    if cmd:
        assert "Example" in result.output


def test_every_command_of_the_brief_is_listed():
    listed = run("--help").output
    for name in ("fetch", "train", "distill", "eval", "analyze-conflict", "export", "compare", "recipes", "data"):
        assert f" {name} " in listed, name


def test_recipes_list_show_validate(tmp_path):
    rows = json.loads(run("recipes", "list", "--json").output)
    assert {"shapes", "coco8", "raccoon", "coco"} <= {r["name"] for r in rows}
    resolved = yaml.safe_load(run("recipes", "show", "coco8", "--resolved", "--set", "train.epochs=3").output)
    assert resolved["data"]["format"] == "yolo" and resolved["train"]["epochs"] == 3 and "runtime" in resolved
    good = tmp_path / "ok.yaml"
    good.write_text("extends: shapes\ntrain:\n  epochs: 2\n")
    result = run("recipes", "validate", good)
    assert result.exit_code == 0 and "ok" in result.output


def test_bad_recipe_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    assert_one_line_error(run("recipes", "validate", bad), str(bad), "did you mean 'train.epochs'")
    assert_one_line_error(run("recipes", "show", "shapez"), "did you mean 'shapes'")
    assert_one_line_error(run("recipes", "validate", "shapes", "--set", "train.lr=fast"), "train.lr")


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    result = run("--debug", "recipes", "validate", bad)
    assert result.exit_code != 0 and result.exception is not None


def test_data_stats_shapes_json():
    stats = json.loads(run("data", "stats", "shapes", "--split", "val", "--json").output)
    assert stats["images"] == 128 and stats["classes"] >= 10 and stats["boxes"] > 0
    assert sum(stats["size_histogram"].values()) == stats["boxes"]


def test_data_stats_on_shared_datasets():
    coco8 = json.loads(run("data", "stats", shared("coco8") / "data.yaml", "--json").output)
    assert (coco8["images"], coco8["boxes"], coco8["classes"]) == (8, 30, 80)
    racc = json.loads(run("data", "stats", shared("raccoon-voc"), "--json").output)
    assert (racc["images"], racc["boxes"], racc["classes"]) == (200, 217, 1)
    fixture = shared("coco-eval-fixtures") / "instances_val2014_100.json"
    coco = json.loads(run("data", "stats", fixture, "--json").output)
    assert coco["images"] == 100 and coco["classes"] == 80
    table = run("data", "stats", shared("raccoon-voc"))
    assert table.exit_code == 0 and "box sizes" in table.output and "raccoon" in table.output


def test_data_bad_inputs_exit_2(tmp_path):
    assert_one_line_error(run("data", "stats", tmp_path / "nope.json"), "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{\"images\": [")
    assert_one_line_error(run("data", "stats", broken), "broken.json")
    assert_one_line_error(run("data", "stats", "shapes", "--split", "test"), "--split")


def test_export_coco_shapes_round_trip_and_no_overwrite(tmp_path):
    out = tmp_path / "out" / "shapes.json"
    result = run("data", "export-coco", "shapes", out, "--split", "val")
    assert result.exit_code == 0, result.output
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 128 and (out.parent / coco["images"][0]["file_name"]).is_file()
    original = json.loads(run("data", "stats", "shapes", "--split", "val", "--json").output)
    again = json.loads(run("data", "stats", out, "--json").output)
    assert (again["images"], again["boxes"], again["per_class"]) == (original["images"], original["boxes"], original["per_class"])
    before = out.read_text()
    assert_one_line_error(run("data", "export-coco", "shapes", out), "already exists", "--force")
    assert out.read_text() == before


def test_eval_reproduces_fixture_and_writes_json(tmp_path):
    fx = shared("coco-eval-fixtures")
    expected = json.loads((fx / "expected.json").read_text())["expected_bbox_stats"]
    out = tmp_path / "metrics.json"
    result = run("eval", "--data", fx / "instances_val2014_100.json",
                 "--predictions", fx / "instances_val2014_fakebbox100_results.json", "--json", out, "--per-class")
    assert result.exit_code == 0, result.output
    assert "AP50" in result.output and "AP per class" in result.output
    metrics = json.loads(out.read_text())["metrics"]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-4), name


def test_eval_on_exported_yolo_ground_truth_is_perfect_for_gt_boxes(tmp_path):
    # Predictions equal to the ground truth (category id = class index + 1) score AP 1.
    data = shared("coco8") / "data.yaml"
    gt = tmp_path / "gt.json"
    assert run("data", "export-coco", data, gt, "--split", "val").exit_code == 0
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
             for a in json.loads(gt.read_text())["annotations"] if not a["iscrowd"]]
    pred_file = tmp_path / "preds.json"
    pred_file.write_text(json.dumps(preds))
    metrics = json.loads(run("eval", "--data", data, "--predictions", pred_file, "--json", "-").output)["metrics"]
    assert metrics["AP"] == pytest.approx(1.0)


def test_eval_bad_predictions_exit_2(tmp_path):
    fx = shared("coco-eval-fixtures")
    bad = tmp_path / "preds.json"
    bad.write_text('[{"image_id": 1}]')
    assert_one_line_error(run("eval", "--data", fx / "instances_val2014_100.json", "--predictions", bad), "preds.json")
