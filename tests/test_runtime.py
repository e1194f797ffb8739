"""`kdctl.export.model_file.load_model_file` on every kind of model file a tiny trained student can
become: the same detections from each, the README's plain onnxruntime script (no kdctl import)
gets the same boxes, `kdctl eval` of an exported file scores like the checkpoint, and files that
are not kdctl exports or requests an end-to-end file cannot honour end in one line."""
import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from kdctl.data.dataset import decode_image
from kdctl.errors import KdctlError
from kdctl.export import export_detector
from kdctl.export.model_file import finalize, load_model_file
from kdctl.export.verify import letterboxed

from conftest import shared
from helpers import assert_one_line_error, run, train_tiny_student

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A GFL student trained 4 steps on 160-px shapes, and its exports (not verified here:
    tests/test_export*.py verify them): every kind of model file."""
    tmp = tmp_path_factory.mktemp("runtime")
    ckpt = train_tiny_student(tmp / "run")
    out = {"checkpoint": ckpt}
    for kind, fmt, name, kw in (("safetensors", "safetensors", "m.export.safetensors", {}),
                                ("onnx", "onnx", "raw.onnx", {}),  # batch fixed at 1: the runner goes image by image
                                ("onnx-end-to-end", "onnx", "e2e.onnx", {"end_to_end": True}),
                                ("torchscript", "torchscript", "m.torchscript.pt", {"dynamic_batch": True})):
        export_detector(ckpt, fmt, out=tmp / name, runs=0, verify=False, **kw)
        out[kind] = tmp / name
    return out


@pytest.fixture(scope="module")
def photos():
    """Two real photos of other sizes than the 160x160 input (one landscape, one portrait or
    square) and a shapes image: letterboxing pads them differently."""
    coco = sorted((shared("coco8") / "images" / "val").glob("*.jpg"))[:2]
    raccoon = sorted((shared("raccoon-voc") / "images").glob("*.jpg"))[:1]
    return [decode_image(p) for p in coco + raccoon], coco + raccoon


def test_every_kind_gives_the_same_detections(files, photos):
    images, _ = photos
    models = {kind: load_model_file(path) for kind, path in files.items()}
    assert {k: m.kind for k, m in models.items()} == {k: k for k in files}
    ref = models["checkpoint"]
    x, valid, scales = letterboxed(images, (160, 160), ref.mean)
    assert (valid < 160).any()  # some images are padded: the final clip matters
    want = ref.detect(x, valid, scales)
    assert want.labels.numel() > 50 and set(want.batch_index.tolist()) == {0, 1, 2}
    for kind, m in models.items():
        assert m.classes == ref.classes and m.mean == pytest.approx(ref.mean) and m.postprocess == ref.postprocess
        assert m.input_size == (None if kind in ("checkpoint", "safetensors") else (160, 160))
        assert m.default_input_size == (160, 160)
        got = m.detect(x, valid, scales)
        assert torch.equal(got.batch_index, want.batch_index) and torch.equal(got.labels, want.labels), kind
        # original pixels: the input-pixel tolerance 1e-3 divided by the scale (<= 1 here)
        assert (got.boxes - want.boxes).abs().max() <= 1e-3 / float(scales.min()), kind
        assert (got.scores - want.scores).abs().max() <= 1e-4, kind
        # boxes lie inside each original image
        h, w = [torch.tensor([im.shape[d] for im in images], dtype=torch.float32)[got.batch_index] for d in (-2, -1)]
        assert (got.boxes[:, 2] <= w + 1e-3).all() and (got.boxes[:, 3] <= h + 1e-3).all() and (got.boxes >= 0).all()


def test_the_final_step_clips_to_the_valid_extent_drops_empty_boxes_and_rescales():
    boxes = torch.tensor([[10.0, 5.0, 90.0, 40.0], [-4.0, 50.0, 30.0, 70.0], [85.0, 0.0, 99.0, 10.0], [0.0, 0.0, 8.0, 8.0]])
    det = finalize(boxes, torch.tensor([0, 0, 0, 1]), torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 2, 3, 4]),
                   valid_sizes=torch.tensor([[60, 80], [64, 64]]), scales=torch.tensor([[0.5, 0.5], [2.0, 2.0]]))
    # image 0 is 80 wide and 60 high inside the input: row 0 clipped at x=80, row 1 at x=0 and
    # y=60, row 2 lies in the padding (x from 85) and is dropped; then / scale
    assert det.batch_index.tolist() == [0, 0, 1] and det.labels.tolist() == [1, 2, 4]
    assert det.boxes.tolist() == [[20.0, 10.0, 160.0, 80.0], [0.0, 100.0, 60.0, 120.0], [0.0, 0.0, 4.0, 4.0]]
    assert det.scores.tolist() == pytest.approx([0.9, 0.8, 0.6])
    kept = finalize(boxes, torch.tensor([0, 0, 0, 1]), torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 2, 3, 4]),
                    valid_sizes=torch.tensor([[60, 80], [64, 64]]), scales=torch.tensor([[0.5, 0.5], [2.0, 2.0]]), drop_empty=False)
    assert kept.labels.tolist() == [1, 2, 3, 4] and kept.boxes[2].tolist() == [160.0, 0.0, 160.0, 20.0]  # torchvision's rule


def readme_script() -> str:
    text = README.read_text()
    block = re.search(r"<!-- e2e-script -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md has no end-to-end onnxruntime script after <!-- e2e-script -->"
    return block.group(1)


def test_the_readme_onnxruntime_script_gets_the_same_boxes_without_kdctl(files, photos, tmp_path):
    script = readme_script()
    assert "kdctl" not in script.replace("kdctl export", "")  # no kdctl import, no kdctl call
    path = tmp_path / "detect.py"
    path.write_text(script)
    _, files_ = photos
    m = load_model_file(files["onnx-end-to-end"])
    for image_file in files_:
        # a fresh interpreter where importing kdctl fails: the script cannot lean on it
        blocker = tmp_path / "kdctl"
        blocker.mkdir(exist_ok=True)
        (blocker / "__init__.py").write_text("raise ImportError('no kdctl here')\n")
        res = subprocess.run([sys.executable, str(path), str(files["onnx-end-to-end"]), str(image_file)], capture_output=True,
                             text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}, timeout=120)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        x, valid, scales = letterboxed([decode_image(image_file)], (160, 160), m.mean)
        want = m.detect(x, valid, scales)
        assert len(got) == want.labels.numel() > 0
        assert [d["class"] for d in got] == [m.classes[i] for i in want.labels.tolist()]
        assert torch.tensor([d["box"] for d in got]).sub(want.boxes).abs().max() <= 1e-3
        assert torch.tensor([d["score"] for d in got]).sub(want.scores).abs().max() <= 1e-4
        # and what `kdctl predict` writes for the same file and image
        pred = run("predict", files["onnx-end-to-end"], image_file, "--out", tmp_path / "pred", "--force", "--conf", "0.002", "--json")
        assert pred.exit_code == 0, pred.output
        (row,) = json.loads((tmp_path / "pred" / "predictions.json").read_text())["images"].values()
        assert row["classes"] == [d["class"] for d in got]
        assert torch.tensor(row["boxes"]).sub(torch.tensor([d["box"] for d in got])).abs().max() <= 1e-3  # JSON: 3 decimals
        assert torch.tensor(row["scores"]).sub(torch.tensor([d["score"] for d in got])).abs().max() <= 1e-4


def test_eval_of_an_exported_file_matches_the_checkpoint(files):
    ref = run("eval", files["checkpoint"], "--json", "-")
    assert ref.exit_code == 0, ref.output
    ap = json.loads(ref.output)["metrics"]["AP"]
    assert ap > 0
    for kind in ("onnx", "onnx-end-to-end", "torchscript"):
        res = run("eval", files[kind], "--json", "-")
        assert res.exit_code == 0, res.output
        got = json.loads(res.output)
        assert got["model_file"]["kind"] == kind and got["num_images"] == 8
        assert abs(100 * got["metrics"]["AP"] - 100 * ap) <= 0.1, kind


def test_an_onnx_file_that_is_not_a_kdctl_export_is_one_line(files, tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["images"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    assert_one_line_error(run("eval", foreign), "foreign.onnx", "not a kdctl export")
    with pytest.raises(KdctlError, match="not a kdctl export"):
        load_model_file(foreign)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not protobuf at all")
    assert_one_line_error(run("eval", garbage), "garbage.onnx", "not a readable ONNX file")
    assert_one_line_error(run("eval", tmp_path / "missing.onnx"), "missing.onnx", "no such file")
    # a kdctl export whose metadata was damaged by hand
    damaged = onnx.load(str(files["onnx-end-to-end"]))
    for p in damaged.metadata_props:
        if p.key == "end_to_end":
            p.value = "{not json"
    onnx.save(damaged, str(tmp_path / "damaged.onnx"))
    assert_one_line_error(run("eval", tmp_path / "damaged.onnx"), "damaged.onnx", "metadata 'end_to_end' is missing or not valid")


def test_an_end_to_end_file_refuses_what_it_cannot_honour(files, photos):
    images, _ = photos
    e2e = load_model_file(files["onnx-end-to-end"])
    ref = load_model_file(files["checkpoint"])
    x, valid, scales = letterboxed(images, (160, 160), e2e.mean)
    for kw, needle in (({"score_thr": 0.001}, "--conf 0.001: e2e.onnx was exported with --conf 0.002"),
                       ({"nms_iou": 0.5}, "--iou 0.5: e2e.onnx was exported with --iou 0.6"),
                       ({"max_det": 101}, "--max-det 101: e2e.onnx was exported with --max-det 100")):
        with pytest.raises(KdctlError, match=re.escape(needle)):
            e2e.detect(x, valid, scales, **kw)
    # a stricter threshold and fewer detections are exact (GFL thresholds its final score)
    for kw in ({"score_thr": 0.01}, {"max_det": 7}, {"score_thr": 0.005, "max_det": 30}):
        a, b = e2e.detect(x, valid, scales, **kw), ref.detect(x, valid, scales, **kw)
        assert a.labels.numel() > 0 and torch.equal(a.labels, b.labels) and torch.equal(a.batch_index, b.batch_index), kw
        assert (a.scores - b.scores).abs().max() <= 1e-4
    with pytest.raises(KdctlError, match="exported for 160x160 inputs, got 192x160"):
        e2e.detect(torch.zeros(1, 3, 192, 160, dtype=torch.uint8), valid[:1], scales[:1])
    with pytest.raises(KdctlError, match="runs with onnxruntime on the CPU"):
        load_model_file(files["onnx-end-to-end"], device="cuda")
