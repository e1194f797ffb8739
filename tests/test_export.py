"""`kdctl export` on a tiny student trained on shapes: ONNX (onnxruntime) and TorchScript against
eager PyTorch, exported safetensors rebuilt by `kdctl.load_detector` and scored by `kdctl eval`,
distillation keys dropped, float16, the verification's pass/fail logic, FLOPs against their
formula, and one-line errors."""
import json
import subprocess
import sys
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kdctl
from kdctl.data.collate import collate
from kdctl.data.shapes import ShapesDataset
from kdctl.evaluation.inference import val_transforms
from kdctl.export import verify as V
from kdctl.export.profile import count_flops, count_params
from kdctl.export.source import TensorPath, read_detector
from kdctl.recipe import load_recipe

from conftest import shared
from helpers import STUDENT_TINY, assert_one_line_error, json_of, run, train_tiny_student

TINY = STUDENT_TINY
NAMES = [f"{b}_p{i}" for b in ("cls", "reg") for i in range(3, 8)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A GFL student (test_resnet, 32 wide) trained 4 steps on 160-px shapes."""
    return train_tiny_student(tmp_path_factory.mktemp("student") / "run")


@pytest.fixture(scope="module")
def val_batch(ckpt):
    """The checkpoint's own val images through kdctl's eval pipeline (transforms + collate)."""
    model = kdctl.load_detector(ckpt)
    r = load_recipe("shapes", TINY)
    s = r.data.shapes
    ds = ShapesDataset(num_images=2, image_size=160, num_classes=s.num_classes, seed=s.seed * 2 + 1,
                       transforms=val_transforms(r.data, model.mean, model.std))
    return collate([ds[0], ds[1]])


def eager(model, images):
    with torch.no_grad():
        return TensorPath(model)(images)


def test_onnx_matches_pytorch_in_onnxruntime(ckpt, val_batch, tmp_path):
    out = tmp_path / "student.onnx"
    res = json_of(run("export", ckpt, "--format", "onnx", "--dynamic-batch", "--out", out, "--runs", "1",
                      "--teacher", ckpt, "--json"))
    v = res["verify"]
    assert v["passed"] and [c["batch"] for c in v["checks"]] == [1, 2]
    if (V.shared_data_dir() or tmp_path).joinpath("coco8").is_dir():
        assert sum("coco8" in label for label in v["images"]) == 2 and "photos" in v["note"]
    for check in v["checks"]:
        assert max(check["diffs"].values()) <= 1e-4
        assert check["detections"]["identical"] and check["detections"]["reference"] > 50
    rep = res["report"]
    assert rep["student"]["params"] == count_params(kdctl.load_detector(ckpt)) == rep["teacher"]["params"]
    assert set(rep["student"]["latency_ms"]) == {"eager", "onnxruntime"} and rep["teacher"]["latency_ms"]["onnxruntime"] > 0
    assert rep["student"]["file_bytes"] == out.stat().st_size

    # independently of kdctl's verifier: onnxruntime on the eval pipeline's batch of 2
    model = kdctl.load_detector(ckpt)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == NAMES == model.raw_names()
    got = [torch.from_numpy(o) for o in sess.run(None, {"images": val_batch.images.numpy()})]
    ref = eager(model, val_batch.images)
    for name, g, r in zip(NAMES, got, ref):
        assert g.shape == r.shape and (g - r).abs().max() <= 1e-4, name
    a = model.predict(val_batch.images, val_batch.valid_sizes, val_batch.scales, score_thr=0.002)
    b = model.postprocess(model.raw_from_tuple(got), val_batch.valid_sizes, val_batch.scales, score_thr=0.002,
                          nms_iou=model.decoder.nms_iou, topk_pre_nms=1000, max_per_image=100)
    assert a.labels.numel() > 50 and torch.equal(a.labels, b.labels) and torch.equal(a.batch_index, b.batch_index)
    assert torch.allclose(a.boxes, b.boxes, rtol=1e-4, atol=1e-4) and torch.allclose(a.scores, b.scores, atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["input_size"]) == [160, 160] and meta["classes"].split("\n")[0] == "circle"
    assert json.loads(meta["mean"]) == pytest.approx(list(model.mean)) and "teacher: null" in meta["recipe"]


def test_torchscript_matches_eager(ckpt, val_batch, tmp_path):
    out = tmp_path / "student.pt"
    res = json_of(run("export", ckpt, "--format", "torchscript", "--out", out, "--runs", "0", "--json"))
    assert res["verify"]["passed"] and res["report"]["student"]["latency_ms"] == {}
    extra = {"kdctl.json": ""}
    with warnings.catch_warnings():  # TorchScript is deprecated in PyTorch 2.14 (it still loads)
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["kdctl.json"])["outputs"] == json.dumps(NAMES)
    model = kdctl.load_detector(ckpt)
    with torch.no_grad():
        got = scripted(val_batch.images)  # traced at batch 1; runs at 2
    for name, g, r in zip(NAMES, got, eager(model, val_batch.images)):
        assert (g - r).abs().max() <= 1e-5, name


def test_exported_safetensors_rebuilds_the_detector_and_evaluates(ckpt, val_batch, tmp_path):
    out = tmp_path / "student.safetensors"
    res = json_of(run("export", ckpt, "--format", "safetensors", "--out", out, "--runs", "0", "--json"))
    assert res["verify"]["passed"] and res["dropped_keys"] == 0
    model, again = kdctl.load_detector(ckpt), kdctl.load_detector(out)
    assert not again.training and set(load_file(str(out))) == set(model.state_dict())
    for r, g in zip(eager(model, val_batch.images), eager(again, val_batch.images)):
        assert torch.equal(r, g)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "kdctl.detector/1" and json.loads(meta["input_size"]) == [160, 160]
    assert "distill:\n  losses: []" in meta["recipe"] and meta["num_classes"] == "10"
    # kdctl eval reads it like the training checkpoint, with the same result
    ap = [json_of(run("eval", path, "--json", "-"))["metrics"] for path in (ckpt, out)]
    assert ap[0] == ap[1]
    on_shapes = json_of(run("eval", out, "--data", "shapes", "--json", "-"))
    assert on_shapes["num_images"] == 128 and 0 <= on_shapes["metrics"]["AP"] <= 1


def test_half_safetensors_is_float16_and_close(ckpt, val_batch, tmp_path):
    out = tmp_path / "half.safetensors"
    res = json_of(run("export", ckpt, "--format", "safetensors", "--half", "--out", out, "--runs", "0", "--json"))
    assert res["dtype"] == "float16" and res["verify"]["passed"]
    floats = [v for v in load_file(str(out)).values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    model, half = kdctl.load_detector(ckpt), kdctl.load_detector(out)
    assert next(half.parameters()).dtype == torch.float32  # upcast on load
    for r, g in zip(eager(model, val_batch.images), eager(half, val_batch.images)):
        assert 0 < (r - g).abs().max() <= V.tolerance(r, half=True)


def test_teacher_and_adapter_keys_are_dropped(ckpt, val_batch, tmp_path):
    state = load_file(str(ckpt))
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    # a Distiller's state dict: the student under "student.", beside a teacher and adapters
    extra = {f"student.{k}": v for k, v in state.items()}
    extra.update({"teacher.head.cls_pred.weight": torch.zeros(10, 64, 3, 3), "crosskd.adapter.weight": torch.zeros(64, 32, 1, 1),
                  "features.0.adapter.weight": torch.zeros(64, 32, 1, 1)})
    src = tmp_path / "distiller.safetensors"
    save_file(extra, str(src), metadata=meta)
    out = tmp_path / "student.safetensors"
    res = json_of(run("export", src, "--format", "safetensors", "--out", out, "--runs", "0", "--json"))
    assert res["dropped_keys"] == 3 and res["dropped"] == "3 (crosskd.*: 1, features.*: 1, teacher.*: 1)"
    exported = load_file(str(out))
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)
    table = run("export", src, "--format", "safetensors", "--out", tmp_path / "again.safetensors", "--runs", "0", "--no-verify")
    assert table.exit_code == 0 and "dropped 3 (crosskd.*: 1" in table.output and "not verified" in table.output


def test_verification_passes_below_and_fails_above_the_tolerance(ckpt):
    src = read_detector(ckpt)
    pics, _ = V.verification_images(src.recipe)
    x, valid, scales = V.preprocess([p for _, p in pics[-2:]], (160, 160), src.model.mean, src.model.std)
    ref = TensorPath(src.model)
    post = src.postprocess_cfg()

    def shifted(index, delta):
        return lambda images: tuple(t + delta if i == index else t for i, t in enumerate(ref(images)))

    def check(runtime):
        checks = V.run_checks(src.model, runtime, ref, x, valid, scales, names=ref.names, post=post, half=False, batch_two=True)
        return checks, V.failure(checks, half=False)

    checks, why = check(shifted(0, 0.5e-4))
    assert why is None and checks[0].diffs["cls_p3"] == pytest.approx(0.5e-4, rel=3e-2) and checks[0].detections["identical"]
    with torch.no_grad():
        tol = V.tolerance(ref(x[:1])[7], half=False)  # 1e-4 relative to reg_p5's largest magnitude
    assert tol >= 1e-4
    checks, why = check(shifted(7, 2.5 * tol))
    assert f"reg_p5 is {2.5 * tol:.3g} > " in why and not checks[0].outputs_ok
    # within tolerance on the raw outputs is not enough: the detections must agree too
    flipped = lambda images: tuple(t.flip(1) if i < 5 else t for i, t in enumerate(ref(images)))  # noqa: E731
    with torch.no_grad():
        n_ref = src.model.postprocess(src.model.raw_from_tuple(ref(x)), valid, scales, **post).labels.numel()
    assert n_ref > 0
    checks = V.run_checks(src.model, flipped, ref, x, valid, scales, names=ref.names, post=post, half=False, batch_two=False)
    checks[0].diffs = dict.fromkeys(checks[0].diffs, 0.0)  # pretend the outputs agreed
    assert "detections differ" in V.failure(checks, half=False)


def test_a_failed_verification_fails_the_command_and_writes_nothing(ckpt, tmp_path, monkeypatch):
    from kdctl.export.onnx import OrtRunner

    real = OrtRunner.__call__
    monkeypatch.setattr(OrtRunner, "__call__", lambda self, x: tuple(t + 1.0 if i == 2 else t for i, t in enumerate(real(self, x))))
    out = tmp_path / "bad.onnx"
    res = run("export", ckpt, "--format", "onnx", "--out", out, "--runs", "0")
    assert res.exit_code == 2 and "verification failed" in res.output and "cls_p5" in res.output
    assert not out.exists() and not list(tmp_path.iterdir())  # no temporary file left either


def test_preprocess_is_the_eval_pipeline(ckpt, val_batch):
    """Square input: kdctl's eval transforms + collate exactly; a landscape photo into a
    landscape input: the eval resize (short side 160, long side up to 224), padded by the data
    layer's letterbox with the mean colour."""
    model = kdctl.load_detector(ckpt)
    r = load_recipe("shapes", TINY)
    ds = ShapesDataset(num_images=2, image_size=160, num_classes=10, seed=r.data.shapes.seed * 2 + 1)
    images, valid, scales = V.preprocess([ds.load_image(ds.records[i]) for i in range(2)], (160, 160), model.mean, model.std)
    assert torch.equal(images, val_batch.images) and torch.equal(valid, val_batch.valid_sizes)
    assert torch.equal(scales, val_batch.scales)

    from kdctl.data.dataset import decode_image
    photo = decode_image(sorted((shared("coco8") / "images" / "val").glob("*.jpg"))[1])
    h, w = photo.shape[-2:]
    assert w > h  # landscape
    data = r.data.model_copy(update={"short_side": 160, "max_side": 224})
    sample = val_transforms(data, model.mean, model.std)({"image": photo})["image"]
    got, valid, scales = V.preprocess([photo], (160, 224), model.mean, model.std)
    nh, nw = sample.shape[-2:]
    assert valid.tolist() == [[nh, nw]] and torch.equal(got[0, :, :nh, :nw], sample.as_subclass(torch.Tensor))
    boxed, _, _ = V.letterboxed([photo], (160, 224), model.mean)
    assert nh < 160 or nw < 224  # there is padding, and it is the mean colour (0.5 -> 128)
    pad = torch.ones(160, 224, dtype=torch.bool)
    pad[:nh, :nw] = False
    assert (boxed[0][:, pad] == 128).all() and got[0][:, pad].abs().max() < 0.01  # ~0 once normalised
    assert scales[0].tolist() == pytest.approx([nh / h, nw / w])


def test_flops_of_a_convolution_follow_the_formula():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2)
    assert count_flops(conv, (32, 64)) == 2 * 3 * 8 * 3 * 3 * 16 * 32  # 2 x MACs at the output size
    assert count_params(conv) == 3 * 8 * 9 + 8


def test_errors_are_one_line_with_exit_2(ckpt, tmp_path):
    assert_one_line_error(run("export", tmp_path / "missing.safetensors", "--format", "onnx"), "missing.safetensors", "no such checkpoint")
    taken = tmp_path / "taken.onnx"
    taken.write_text("keep me")
    assert_one_line_error(run("export", ckpt, "--format", "onnx", "--out", taken), "taken.onnx", "already exists", "--force")
    assert taken.read_text() == "keep me"
    assert_one_line_error(run("export", ckpt, "--format", "tflite"), "--format", "onnx")
    assert_one_line_error(run("export", ckpt, "--format", "safetensors", "--opset", "17"), "--opset")
    assert_one_line_error(run("export", ckpt, "--format", "onnx", "--input-size", "100", "160"), "--input-size", "use 128")
    assert_one_line_error(run("export", ckpt, "--format", "onnx", "--teacher", tmp_path / "t.safetensors"), "t.safetensors")
    assert not (ckpt.parent / "best.onnx").exists()
    help_text = run("export", "--help").output
    assert "Example" in help_text and "--dynamic-batch" in help_text


def test_import_kdctl_stays_light():
    code = "import sys, kdctl; assert callable(kdctl.load_detector); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
