"""README "Distil onto your own data": the commands run as written, in a temporary folder.

The only changes are for speed, appended to the training commands: tiny models
(`test_resnet`, 64-wide necks and heads as the demo), one epoch, one thread, no data workers. Everything else
— the exported 2-class dataset, `init_from` of the 4-class teacher, CrossKD from the fine-tuned
teacher and from the 4-class teacher through `class_map: auto`, eval and ONNX export — is what a
user types.
"""
import json
import re
import shlex

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdctl.cli import app

from conftest import ROOT

SPEED = ["train.epochs=1", "runtime.threads=1", "data.num_workers=0", "train.warmup_iters=2", "data.batch_size=16"]
for _side in ("teacher", "student"):
    SPEED += [f"model.{_side}.backbone=test_resnet", f"model.{_side}.fpn_channels=64", f"model.{_side}.feat_channels=64"]


def readme_workflow() -> tuple[list[list[str]], str]:
    """The kdctl commands and the recipe of the README's workflow block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- workflow -->(.*?)<!-- /workflow -->", text, flags=re.S).group(1)
    bash, recipe = re.findall(r"```(?:bash|yaml)\n(.*?)```", block, flags=re.S)
    commands = [shlex.split(line, comments=True) for line in bash.splitlines() if line.strip().startswith("kdctl ")]
    return commands, recipe


def test_readme_workflow_runs_as_written(tmp_path, monkeypatch):
    commands, recipe = readme_workflow()
    assert [c[:2] for c in commands] == [["kdctl", "train"], ["kdctl", "data"], ["kdctl", "data"], ["kdctl", "train"],
                                         ["kdctl", "distill"], ["kdctl", "distill"], ["kdctl", "eval"], ["kdctl", "export"]]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-data.yaml").write_text(recipe)
    runner = CliRunner()
    for cmd in commands:
        args = cmd[1:]
        if args[0] in ("train", "distill"):
            args += [x for s in SPEED for x in ("--set", s)]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, f"{shlex.join(cmd)}\n{res.output}"
    # the 2-class teacher started from the 4-class one: its star and circle rows are the big one's
    plan = json.loads((tmp_path / "runs/my-teacher/metrics.jsonl").read_text().splitlines()[0])
    init = plan["detector"]["init"]
    assert init["class_rows"]["map"] == {"star": "star", "circle": "circle"} and init["reinitialised"] == 0
    # distilled straight from the 4-class teacher: the class map picked its star and circle rows
    plan = json.loads((tmp_path / "runs/my-student-big/metrics.jsonl").read_text().splitlines()[0])
    assert plan["class_map"]["teacher_classes"] == 4 and plan["class_map"]["map"] == {"star": "star", "circle": "circle"}
    assert (tmp_path / "runs/my-student.onnx").is_file()
    big = load_file(str(tmp_path / "runs/big-teacher/best.safetensors"))
    assert big["head.cls_pred.weight"].shape[0] == 4


@pytest.mark.parametrize("bad, message", [
    ("model.teacher.init_from=runs/none.safetensors", "no such checkpoint"),
    ("distill.class_map={hexagon: star}", "hexagon"),
])
def test_workflow_bad_inputs_are_one_line_and_create_nothing(tmp_path, monkeypatch, bad, message):
    commands, recipe = readme_workflow()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-data.yaml").write_text(recipe)
    runner = CliRunner()
    for cmd in commands[:3]:
        args = cmd[1:] + ([x for s in [*SPEED, "data.shapes.train_images=16", "data.shapes.val_images=8"] for x in ("--set", s)]
                          if cmd[1] == "train" else [])
        assert runner.invoke(app, args).exit_code == 0
    command = ["distill", "my-data.yaml", "--teacher", "runs/big-teacher/best.safetensors", "--method", "crosskd"]
    if bad.startswith("model.teacher"):
        command = ["train", "my-data.yaml", "--model", "teacher"]
    res = runner.invoke(app, [*command, "--set", bad, "--out", "runs/bad"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "runs/bad").exists()
