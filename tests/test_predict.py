"""`kdctl predict` on a tiny student over generated images: pictures, predictions.json and YOLO
pseudo-labels that kdctl's reader loads back; the same detections from the checkpoint and its
safetensors, raw ONNX and end-to-end ONNX exports; bad inputs as one line with exit 2; and
`kdctl compare --plot`."""
import json
import re
import shlex
import sys
import warnings

import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kdctl.cli import app
from kdctl.data.shapes import ShapesDataset
from kdctl.data.yolo import YoloDataset

from conftest import ROOT
from helpers import assert_one_line_error, json_of, run, train_tiny_student

CONF = "0.01"  # gives ~100 boxes per image from that student


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A GFL student (test_resnet, 32 wide) trained 4 steps on 160-px shapes."""
    return train_tiny_student(tmp_path_factory.mktemp("student") / "run")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Shapes images as files: 2 PNG at the top, 1 JPEG, one 100x160 PNG in a subfolder."""
    folder = tmp_path_factory.mktemp("photos")
    ds = ShapesDataset(num_images=4, image_size=160, num_classes=10, seed=7)
    (folder / "sub").mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.jpg", "sub/d.png"]):
        pixels = ds.load_image(ds.records[i]).permute(1, 2, 0).numpy()
        Image.fromarray(pixels[:100] if i == 3 else pixels).save(folder / name)
    return folder


def predictions(folder):
    return json.loads((folder / "predictions.json").read_text())


def test_predict_writes_pictures_json_and_labels_that_kdctl_reads_back(ckpt, photos, tmp_path):
    out = tmp_path / "pred"
    res = json_of(run("predict", ckpt, photos, "--out", out, "--conf", CONF, "--save-labels", "--json"))
    assert res["images"] == 4 and res["skipped"] == [] and res["input_size"] == [160, 160] and res["out"] == str(out)
    doc = predictions(out)
    assert set(doc["images"]) == {"a.png", "b.png", "c.jpg", "sub/d.png"} and doc["classes"][0] == "circle"
    assert res["boxes"] == sum(len(r["boxes"]) for r in doc["images"].values()) > 100
    for name, rec in doc["images"].items():
        w, h = (160, 100) if name == "sub/d.png" else (160, 160)
        assert (rec["width"], rec["height"]) == (w, h) and len(rec["boxes"]) == len(rec["scores"]) == len(rec["classes"])
        assert all(s >= float(CONF) for s in rec["scores"]) and rec["scores"] == sorted(rec["scores"], reverse=True)
        boxes = torch.tensor(rec["boxes"]).reshape(-1, 4)
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes[:, 2].max() <= w + 1e-3 and boxes[:, 3].max() <= h + 1e-3
        with Image.open(out / "drawn" / name) as im:  # the picture opens, at the original size
            assert im.size == (w, h)
    with Image.open(out / "drawn" / "a.png") as drawn, Image.open(photos / "a.png") as plain:
        assert drawn.tobytes() != plain.tobytes()  # boxes were drawn on it

    # the folder is a YOLO dataset: kdctl's reader gives back exactly the predictions
    ds = YoloDataset(out / "data.yaml", "train")
    assert ds.classes == doc["classes"] and len(ds) == 4 and ds.report.skipped == []
    for rec in ds.records:
        pred = doc["images"][rec.file_name.removeprefix("images/")]
        assert [ds.classes[c] for c in rec.labels.tolist()] == pred["classes"]
        assert torch.allclose(torch.from_numpy(rec.boxes).double(), torch.tensor(pred["boxes"]).double().reshape(-1, 4), atol=2e-3)
    stats = json_of(run("data", "stats", out / "data.yaml", "--json"))
    assert stats["images"] == 4 and stats["boxes"] == res["boxes"]


def test_same_detections_from_checkpoint_safetensors_raw_and_end_to_end_onnx(ckpt, photos, tmp_path):
    files = {"checkpoint": ckpt}
    for name, args in {"safetensors": ["safetensors"], "onnx": ["onnx"], "e2e": ["onnx", "--end-to-end"]}.items():
        files[name] = tmp_path / f"{name}.{args[0]}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = run("export", ckpt, "--format", *args, "--out", files[name], "--input-size", "160", "160",
                    "--no-verify", "--runs", "0", "--json")
        assert r.exit_code == 0, r.output
    docs = {}
    for name, file in files.items():
        res = json_of(run("predict", file, photos, "--out", tmp_path / f"p-{name}", "--conf", CONF, "--json"))
        docs[name] = predictions(tmp_path / f"p-{name}")["images"]
        assert res["images"] == 4
    assert json_of(run("predict", files["e2e"], photos / "a.png", "--out", tmp_path / "kind", "--json"))["kind"] == "onnx-end-to-end"
    ref = docs["checkpoint"]
    assert sum(len(r["boxes"]) for r in ref.values()) > 100
    for name, doc in docs.items():
        for image, r in ref.items():
            assert same_detections(doc[image], r), (name, image)
    moved = json.loads(json.dumps(ref["a.png"]))
    moved["boxes"][5][0] += 0.01
    assert not same_detections(moved, ref["a.png"])  # the comparison does see a 0.01 px move


def same_detections(got: dict, ref: dict, box_tol=2e-3, score_tol=2e-5) -> bool:
    """The same detections: equal counts; the i-th best scores within ``score_tol``; every
    reference row matched by a distinct row of the same class with its box within ``box_tol`` px
    and its score within ``score_tol``. Rows may only trade places where their scores tie within
    the tolerance (this untrained student has many scores equal to 1e-5)."""
    if len(got["scores"]) != len(ref["scores"]):
        return False
    if not torch.allclose(torch.tensor(got["scores"]), torch.tensor(ref["scores"]), atol=score_tol, rtol=0):
        return False
    boxes, free = torch.tensor(got["boxes"]).reshape(-1, 4), set(range(len(got["scores"])))
    for cls, box, score in zip(ref["classes"], torch.tensor(ref["boxes"]).reshape(-1, 4), ref["scores"]):
        hit = next((j for j in sorted(free) if got["classes"][j] == cls and abs(got["scores"][j] - score) <= score_tol
                    and (boxes[j] - box).abs().max() <= box_tol), None)
        if hit is None:
            return False
        free.discard(hit)
    return True


def test_dataset_source_limit_and_classes_in_the_order_given(ckpt, tmp_path):
    out = tmp_path / "pseudo"
    res = json_of(run("predict", ckpt, "--data", "shapes", "--split", "val", "--limit", "3", "--classes", "star,circle",
                      "--conf", CONF, "--save-labels", "--out", out, "--json"))
    doc = predictions(out)
    assert res["images"] == 3 and list(doc["images"]) == ["000000.png", "000001.png", "000002.png"]
    assert doc["classes"] == ["star", "circle"]
    assert {c for r in doc["images"].values() for c in r["classes"]} <= {"star", "circle"} and res["boxes"] > 0
    ds = YoloDataset(out / "data.yaml", "val")  # generated pixels were written as images/*.png
    assert ds.classes == ["star", "circle"] and len(ds) == 3
    assert sum(len(r.labels) for r in ds.records) == res["boxes"]


def test_classes_are_chosen_before_the_max_det_cut(ckpt, photos, tmp_path):
    """``--classes C --max-det 1`` gives each image its best C box, even where other classes
    score higher (they take no slot): the first C row of the unrestricted result."""
    json_of(run("predict", ckpt, photos, "--conf", CONF, "--out", tmp_path / "full", "--json"))
    full = predictions(tmp_path / "full")["images"]
    # a class every image has but that is not every image's best: filtering after the cut would lose it
    names = [c for c in full["a.png"]["classes"] if all(c in r["classes"] for r in full.values())]
    cls = next(c for c in names if any(r["classes"][0] != c for r in full.values()))
    json_of(run("predict", ckpt, photos, "--conf", CONF, "--classes", cls, "--max-det", "1", "--out", tmp_path / "one",
                "--json"))
    one = predictions(tmp_path / "one")["images"]
    for image, r in full.items():
        i = r["classes"].index(cls)
        want = {"classes": [cls], "scores": [r["scores"][i]], "boxes": [r["boxes"][i]]}
        assert same_detections(one[image], want), image


def test_unreadable_image_is_skipped_and_listed_or_fails_with_strict(ckpt, photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes((photos / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    res = json_of(run("predict", ckpt, folder, "--out", tmp_path / "p", "--json"))
    assert res["images"] == 2 and [s["file"] for s in res["skipped"]] == ["broken.jpg"]
    assert predictions(tmp_path / "p")["skipped"][0]["file"] == "broken.jpg"
    assert_one_line_error(run("predict", ckpt, folder, "--out", tmp_path / "q", "--strict"), "broken.jpg", "--strict")
    # one image a batch: a.png and b.png are written before broken.jpg stops the run, then removed
    assert_one_line_error(run("predict", ckpt, folder, "--out", tmp_path / "q", "--strict", "--batch-size", "1"), "broken.jpg")
    assert not (tmp_path / "q").exists()


def test_output_folder_is_never_overwritten_silently(ckpt, photos, tmp_path, monkeypatch):
    out = tmp_path / "p"
    json_of(run("predict", ckpt, photos / "a.png", "--out", out, "--json"))
    assert_one_line_error(run("predict", ckpt, photos / "b.png", "--out", out), str(out), "--force")
    assert list(predictions(out)["images"]) == ["a.png"]
    json_of(run("predict", ckpt, photos / "b.png", "--out", out, "--force", "--json"))
    assert list(predictions(out)["images"]) == ["b.png"] and not (out / "drawn" / "a.png").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert_one_line_error(run("predict", ckpt, photos / "a.png", "--out", mine, "--force"), "did not write it")
    assert (mine / "notes.txt").read_text() == "keep"
    monkeypatch.chdir(tmp_path)  # without --out: runs/predict, then runs/predict-2
    first = json_of(run("predict", ckpt, photos / "a.png", "--json"))
    second = json_of(run("predict", ckpt, photos / "a.png", "--json"))
    assert (first["out"], second["out"], second["out_chosen"]) == ("runs/predict", "runs/predict-2", "numbered")


def test_bad_inputs_are_one_line_with_exit_2(ckpt, photos, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    (empty / "deeper").mkdir(parents=True)
    (empty / "deeper" / "notes.txt").write_text("no images here")
    assert_one_line_error(run("predict", ckpt, empty, "--out", tmp_path / "o1"), "empty", "no images")
    assert_one_line_error(run("predict", ckpt, tmp_path / "nope", "--out", tmp_path / "o2"), "nope", "no such file")
    assert_one_line_error(run("predict", ckpt, str(tmp_path / "*.png"), "--out", tmp_path / "o3"), "*.png", "matches no images")
    assert_one_line_error(run("predict", ckpt, "--out", tmp_path / "o4"), "no SOURCE")
    assert_one_line_error(run("predict", ckpt, photos, "--classes", "circle,unicorn", "--out", tmp_path / "o5"), "unicorn")
    assert_one_line_error(run("predict", ckpt, photos, "--input-size", "100", "160", "--out", tmp_path / "o6"), "multiples of 32")
    assert_one_line_error(run("predict", ckpt, photos, "--data", "shapes", "--out", tmp_path / "o7"), "not both")
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX graph that kdctl did not write
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])), foreign)
    assert_one_line_error(run("predict", foreign, photos, "--out", tmp_path / "o8"), "foreign.onnx", "not a kdctl export")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    assert_one_line_error(run("predict", ckpt, video, "--out", tmp_path / "o9"), "clip.mp4", "PyAV", "kdctl[video]")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 10))


def test_video_frames_are_predicted_with_pyav(ckpt, tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), 60 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    res = json_of(run("predict", ckpt, video, "--out", tmp_path / "v", "--conf", CONF, "--json"))
    doc = predictions(tmp_path / "v")
    assert res["images"] == 3 and list(doc["images"]) == [f"clip_{i:06d}.jpg" for i in range(3)]
    assert [r["frame"] for r in doc["images"].values()] == [0, 1, 2] and doc["images"]["clip_000000.jpg"]["width"] == 96
    with Image.open(tmp_path / "v" / "drawn" / "clip_000002.jpg") as im:
        assert im.size == (96, 64)


def test_curves_are_read_from_metrics_jsonl(tmp_path):
    from kdctl.runs.curves import run_curves

    rows = [{"step": 0, "epoch": 0, "kind": "plan"}, {"step": 10, "epoch": 0, "kind": "train", "loss": 2.5},
            {"step": 20, "epoch": 0, "kind": "train", "loss": None}, {"step": 20, "epoch": 0, "kind": "eval", "AP": 0.125},
            {"step": 30, "epoch": 1, "kind": "train", "loss": 1.5}, {"step": 40, "epoch": 1, "kind": "eval", "AP": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5')  # a cut last line
    assert run_curves(tmp_path) == {"ap": [(1, 12.5), (2, 25.0)], "loss": [(10, 2.5), (30, 1.5)]}


def test_compare_plot_writes_a_png(ckpt, tmp_path):
    run_dir = ckpt.parent
    png = tmp_path / "curves.png"
    result = run("compare", run_dir, run_dir, "--plot", png)
    assert result.exit_code == 0, result.output
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1200, 450)
    assert_one_line_error(run("compare", run_dir, "--plot", tmp_path / "curves.jpg"), "curves.jpg", ".png")


def readme_pseudo_labels() -> tuple[list[list[str]], str]:
    """The kdctl commands and the recipe of the README's pseudo-label block."""
    block = re.search(r"<!-- pseudo-labels -->(.*?)<!-- /pseudo-labels -->", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    bash, recipe = re.findall(r"```(?:bash|yaml)\n(.*?)```", block, flags=re.S)
    return [shlex.split(ln, comments=True) for ln in bash.splitlines() if ln.strip().startswith("kdctl ")], recipe


def test_readme_pseudo_label_workflow_runs_as_written(tmp_path, monkeypatch):
    """As written, except for speed (tiny models, one epoch, 32 teacher images) and a lower
    --conf (a one-epoch teacher scores below the README's 0.3)."""
    commands, recipe = readme_pseudo_labels()
    assert [c[1] for c in commands] == ["train", "data", "predict", "data", "distill", "eval"]
    speed = ["train.epochs=1", "runtime.threads=1", "data.num_workers=0", "train.warmup_iters=2", "data.shapes.train_images=32"]
    speed += [f"model.{side}.{key}" for side in ("teacher", "student")
              for key in ("backbone=test_resnet", "fpn_channels=32", "feat_channels=32")]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pseudo.yaml").write_text(recipe)
    for cmd in commands:
        args = cmd[1:] + {"train": [x for s in speed for x in ("--set", s)], "distill": [x for s in speed for x in ("--set", s)],
                          "predict": ["--conf", "0.02"]}.get(cmd[1], [])
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, f"{shlex.join(cmd)}\n{res.output}"
    doc = predictions(tmp_path / "runs/pseudo")
    ds = YoloDataset(tmp_path / "runs/pseudo/data.yaml", "train")
    assert len(ds) == len(doc["images"]) == 128 and ds.classes == ["circle", "square", "triangle", "star"]
    assert sum(len(r.labels) for r in ds.records) == sum(len(r["classes"]) for r in doc["images"].values()) > 0
    plan = json.loads((tmp_path / "runs/pseudo-student/metrics.jsonl").read_text().splitlines()[0])
    assert plan["data"]["format"] == "yolo" and plan["data"]["train_images"] == 128
