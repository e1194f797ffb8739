"""The run plan: `kdctl train` / `kdctl distill` say what they are about to do before the first
step, record it as the first line of metrics.jsonl, and `--dry-run` stops there with nothing
created."""
import json

from typer.testing import CliRunner

from kdctl.cli import app
from helpers import run

TINY = [
    "data.shapes.train_images=16", "data.shapes.val_images=8", "data.shapes.image_size=96",
    "data.short_side=96", "data.max_side=96", "data.batch_size=4", "data.num_workers=0",
    "train.epochs=2", "train.warmup_iters=4", "runtime.threads=1",
]


def sets(*extra):
    args = []
    for item in (*TINY, *extra):
        args += ["--set", item]
    return args


def side(which, width=32):
    return [f"model.{which}.backbone=test_resnet", f"model.{which}.fpn_channels={width}",
            f"model.{which}.feat_channels={width}", f"model.{which}.stacked_convs=2"]


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path):
    out = tmp_path / "run"
    res = run("train", "shapes", *sets(*side("student")), "--out", out, "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert not out.exists()
    assert plan["command"] == "train" and plan["model"] == "student"
    s = plan["detector"]
    assert (s["family"], s["backbone"], s["num_classes"]) == ("gfl", "test_resnet", 10)
    assert s["classes"][:3] == ["circle", "square", "triangle"] and s["params"] >= s["trainable"] > 0
    assert plan["schedule"]["steps_per_epoch"] == 4 and plan["schedule"]["total_steps"] == 8
    assert plan["schedule"]["batch"] == 4 and plan["data"]["train_images"] == 16
    # without --json: one fact per line, still nothing created
    res = run("train", "shapes", *sets(*side("student")), "--out", out, "--dry-run")
    assert res.exit_code == 0 and "schedule: 2 epochs x 4 steps = 8 steps" in res.output and not out.exists()


def test_distill_plan_names_teacher_methods_and_weights_and_is_recorded(tmp_path):
    teacher = tmp_path / "teacher"
    res = run("train", "shapes", "--model", "teacher", *sets(*side("teacher", 64), "train.epochs=1"), "--out", teacher)
    assert res.exit_code == 0, res.output
    out = tmp_path / "student"
    args = ["distill", "shapes", "--teacher", teacher / "last.safetensors", "--method", "crosskd,ssim",
            *sets(*side("student"), "train.epochs=1", "distill.losses.0.reuse_idx=2"), "--out", out]
    res = run(*args, "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert not out.exists()
    assert plan["command"] == "distill" and plan["teacher"]["family"] == "gfl" and plan["teacher"]["trainable"] == 0
    crosskd, ssim = plan["methods"]
    assert (crosskd["type"], crosskd["weight"], crosskd["cls_weight"], crosskd["reg_weight"]) == ("crosskd", 1.0, 1.0, 4.0)
    assert crosskd["reuse_idx"] == 2 and crosskd["adapters"]  # 32 -> 64 channels
    assert (ssim["type"], ssim["reads"], ssim["adapters"]) == ("ssim", ["neck"], True)
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert "KD crosskd: weight 1, cls_weight 1, reg_weight 4, reuse_idx 2, adapters" in res.output
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "plan" and first["methods"] == plan["methods"] and first["teacher"] == plan["teacher"]
