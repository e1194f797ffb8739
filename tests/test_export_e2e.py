"""`kdctl export --format onnx --end-to-end`: uint8 images in, boxes/scores/labels/num_detections
out with class-wise NMS inside the graph, verified against kdctl's own postprocess; the NMS op
against ONNX NonMaxSuppression; the candidate rule (clip, empty boxes dropped) by hand; baked
settings and one-line errors."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from kdctl.engine.trainer import Trainer
from kdctl.export.end_to_end import OUTPUT_NAMES, nms_classwise
from kdctl.export.model_file import normalise
from kdctl.models.postprocess import candidates
from kdctl.export.source import read_detector
from kdctl.export.verify import letterboxed, verification_images
from kdctl.models.decoders import DistanceDecoder
from kdctl.models.priors import Priors
from kdctl.recipe import load_recipe

from helpers import STUDENT_TINY as TINY, assert_one_line_error, json_of, run, train_tiny_student


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A GFL student (test_resnet, 32 wide) trained 4 steps on 160-px shapes."""
    return train_tiny_student(tmp_path_factory.mktemp("e2e") / "run")


@pytest.fixture(scope="module")
def exported(ckpt):
    out = ckpt.parent / "e2e.onnx"
    return out, json_of(run("export", ckpt, "--format", "onnx", "--end-to-end", "--out", out, "--runs", "1", "--json"))


def test_end_to_end_export_is_verified_against_kdctls_postprocess(exported):
    out, res = exported
    v = res["verify"]
    assert v["passed"] and v["runtime"] == "onnxruntime, end-to-end" and [c["batch"] for c in v["checks"]] == [1, 2]
    for c in v["checks"]:
        assert c["detections"]["identical"] and c["detections"]["reference"] > 50
        assert c["diffs"]["boxes"] <= 1e-3 and c["diffs"]["scores"] <= 1e-4
    assert res["outputs"] == OUTPUT_NAMES and res["dynamic_batch"] and res["end_to_end"]["max_per_image"] == 100
    assert res["report"]["student"]["latency_ms"]["onnxruntime"] > 0


def test_the_graph_takes_uint8_any_batch_and_carries_what_a_deployer_needs(exported, ckpt):
    out, _ = exported
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [3, 160, 160] and isinstance(inp.shape[0], str)
    assert [o.name for o in sess.get_outputs()] == OUTPUT_NAMES
    meta = sess.get_modelmeta().custom_metadata_map
    e2e = json.loads(meta["end_to_end"])
    src = read_detector(ckpt)
    assert json.loads(meta["input_size"]) == [160, 160] and meta["classes"].split("\n") == src.classes
    assert src.model.mean == pytest.approx((0.5, 0.5, 0.5)) and e2e["pad_colour"] == [128, 128, 128]  # round(255 * 0.5)
    assert e2e["score_rule"] == "cls"
    assert (e2e["score_thr"], e2e["nms_iou"], e2e["max_det"], e2e["topk_pre_nms"]) == (0.002, 0.6, 100, 1000)
    # a batch of three equals the three images alone
    pics, _ = verification_images(src.recipe)
    x, _, _ = letterboxed([p for _, p in pics[:3]], (160, 160), src.model.mean)
    together = sess.run(None, {"images": x.numpy()})
    for i in range(3):
        alone = sess.run(None, {"images": x[i:i + 1].numpy()})
        for a, b in zip(alone, together):
            np.testing.assert_allclose(a[0], b[i], atol=1e-4)
    boxes, scores, labels, num = together
    assert boxes.shape == (3, 100, 4) and labels.dtype == np.int64 and num.dtype == np.int64
    n = int(num[0])
    assert 0 < n <= 100 and (np.diff(scores[0, :n]) <= 0).all()  # best first
    assert (labels[0, n:] == -1).all() and (scores[0, n:] == 0).all() and (boxes[0, n:] == 0).all()
    assert (boxes[0, :n, 2:] <= 160).all() and (boxes[0, :n] >= 0).all()  # clipped to the input


def test_nms_op_matches_onnx_nonmaxsuppression():
    """kdctl::nms_classwise (what tracing sees) against onnxruntime's NonMaxSuppression on
    random overlapping boxes in 2 images x 3 classes, with a score threshold and a per-class cap."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(2, 60, 2, generator=g) * 20], -1)
    scores = torch.rand(2, 3, 60, generator=g)
    scores[scores < 0.3] = -1.0
    got = nms_classwise(boxes, scores, 7, 0.45, -0.5)
    node = helper.make_node("NonMaxSuppression", ["b", "s", "m", "i", "t"], ["sel"], center_point_box=0)
    graph = helper.make_graph(
        [node], "nms",
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 60, 4]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3, 60])],
        [helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])],
        initializer=[helper.make_tensor("m", TensorProto.INT64, [1], [7]), helper.make_tensor("i", TensorProto.FLOAT, [1], [0.45]),
                     helper.make_tensor("t", TensorProto.FLOAT, [1], [-0.5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"b": boxes.numpy(), "s": scores.numpy()})
    assert got.shape[0] > 20 and got.tolist() == want.tolist()  # same rows, same order (batch, class, best first)
    counts = torch.bincount(got[:, 0] * 3 + got[:, 1])
    assert counts.max() == 7  # the cap bites


CANVAS = torch.tensor([100.0, 100.0, 100.0, 100.0])  # the clip extent (W, H, W, H) of a 100x100 input


def test_candidates_clip_to_the_input_and_drop_empty_boxes():
    """One level, 3 points, 1 class, FCOS distances: a box reaching past the 100x100 input is
    clipped; one lying right of it becomes empty and is dropped; one below the threshold too."""
    pri = Priors(points=torch.tensor([[20.0, 20.0], [90.0, 50.0], [130.0, 50.0]]), stride=torch.tensor([8.0, 8.0, 8.0]),
                 level=torch.zeros(3, dtype=torch.long), anchors=None, num_level_priors=[3])
    reg = torch.tensor([[[5.0, 5.0, 5.0, 5.0], [10.0, 4.0, 20.0, 4.0], [6.0, 2.0, 6.0, 2.0]]])  # l, t, r, b
    cls = torch.logit(torch.tensor([[[0.9], [0.8], [0.7]]]))
    boxes, scores, labels, keep = candidates(DistanceDecoder(0.5, score="cls"), {"cls": cls, "reg": reg}, pri, CANVAS,
                                             score_thr=0.75, topk_pre_nms=1000)
    assert boxes[0].tolist() == [[15.0, 15.0, 25.0, 25.0], [80.0, 46.0, 100.0, 54.0], [100.0, 48.0, 100.0, 52.0]]
    assert scores[0].tolist() == pytest.approx([0.9, 0.8, 0.7]) and labels[0].tolist() == [0, 0, 0]
    assert keep[0].tolist() == [True, True, False]
    _, _, _, keep = candidates(DistanceDecoder(0.5, score="cls"), {"cls": cls, "reg": reg}, pri, CANVAS,
                               score_thr=0.5, topk_pre_nms=1000)
    assert keep[0].tolist() == [True, True, False]  # above the threshold, but empty: dropped
    keeps_empty = DistanceDecoder(0.5, score="cls")
    keeps_empty.drop_empty = False  # models converted from torchvision keep empty boxes, as postprocess does
    _, _, _, keep = candidates(keeps_empty, {"cls": cls, "reg": reg}, pri, CANVAS, score_thr=0.5, topk_pre_nms=1000)
    assert keep[0].tolist() == [True, True, True]


def test_an_anchor_family_with_centerness_exports_end_to_end(tmp_path):
    """ATSS: anchors, delta decoding, score = cls * centerness thresholded on cls; baked
    --conf / --max-det."""
    recipe = load_recipe("shapes", [*TINY, "model.student.head=atss"])
    Trainer(recipe, tmp_path / "run", quiet=True).fit()
    out = tmp_path / "atss.onnx"
    res = json_of(run("export", tmp_path / "run" / "best.safetensors", "--format", "onnx", "--end-to-end", "--conf", "0.01",
                      "--max-det", "20", "--out", out, "--runs", "0", "--json"))
    assert res["verify"]["passed"] and all(c["detections"]["reference"] > 5 for c in res["verify"]["checks"])
    assert res["end_to_end"]["score_thr"] == 0.01 and res["end_to_end"]["max_per_image"] == 20
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["end_to_end"])["score_rule"] == "centerness" and json.loads(meta["postprocess"])["max_per_image"] == 20
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"images": np.zeros((2, 3, 160, 160), np.uint8)})[0].shape == (2, 20, 4)
    # through the runner: the checkpoint's detections, including rows whose cls score passed
    # the threshold but whose final score (x centerness) lies below it
    from kdctl.export.model_file import load_model_file

    e2e, ref = load_model_file(out), load_model_file(tmp_path / "run" / "best.safetensors")
    src = read_detector(tmp_path / "run" / "best.safetensors")
    x, valid, scales = letterboxed([p for _, p in verification_images(src.recipe)[0]], (160, 160), src.model.mean)
    a, b = e2e.detect(x, valid, scales), ref.detect(x, valid, scales, score_thr=0.01, max_det=20)
    assert a.labels.numel() > 5 and torch.equal(a.labels, b.labels) and torch.equal(a.batch_index, b.batch_index)
    assert (a.scores - b.scores).abs().max() <= 1e-4 and (a.scores <= 0.01).any()


def test_verification_fails_a_graph_whose_boxes_or_order_differ(exported, ckpt):
    """The writing and the atomic rename are the raw export's (tests/test_export.py); here the
    end-to-end comparison: boxes 2e-3 px off fail, 0.5e-3 px pass; swapped rows fail."""
    from kdctl.export import verify_export
    from kdctl.export.onnx import OrtRunner

    out, res = exported
    src, real = read_detector(ckpt), OrtRunner(out)
    post = res["end_to_end"]

    def shifted(delta):
        return lambda x: tuple(t + delta if i == 0 else t for i, t in enumerate(real(x)))

    def swapped(x):
        boxes, scores, labels, num = real(x)
        return boxes[:, [1, 0, *range(2, boxes.shape[1])]], scores, labels[:, [1, 0, *range(2, labels.shape[1])]], num

    ok = verify_export(src, shifted(0.5e-3), "onnx", (160, 160), half=False, dynamic_batch=True, post=post)
    assert ok["passed"] and 0.4e-3 < ok["checks"][0]["diffs"]["boxes"] <= 0.6e-3
    bad = verify_export(src, shifted(2e-3), "onnx", (160, 160), half=False, dynamic_batch=True, post=post)
    assert not bad["passed"] and "max |export - pytorch| of boxes is 0.002" in bad["failure"]
    order = verify_export(src, swapped, "onnx", (160, 160), half=False, dynamic_batch=True, post=post)
    assert not order["passed"]  # rows out of order: other labels, or the same labels with other boxes


def test_end_to_end_options_are_checked_in_one_line(ckpt, tmp_path):
    assert_one_line_error(run("export", ckpt, "--format", "torchscript", "--end-to-end", "--out", tmp_path / "x.pt"),
                          "--end-to-end applies to --format onnx only")
    assert_one_line_error(run("export", ckpt, "--format", "onnx", "--conf", "0.3", "--out", tmp_path / "x.onnx"),
                          "--conf, --iou and --max-det are baked into an --end-to-end export only")
    assert_one_line_error(run("export", ckpt, "--format", "onnx", "--end-to-end", "--half", "--out", tmp_path / "x.onnx"),
                          "--end-to-end and --half")
    assert_one_line_error(run("export", ckpt, "--format", "onnx", "--end-to-end", "--iou", "1.5", "--out", tmp_path / "x.onnx"),
                          "--iou 1.5: out of range")
    assert not list(tmp_path.iterdir())


def test_the_graph_normalises_like_the_runner(ckpt):
    """The graph's first step equals kdctl's normalisation of the uint8 input (the arithmetic of
    ToFloatNormalize): the raw head outputs of both agree exactly in PyTorch."""
    from kdctl.export.end_to_end import EndToEnd

    src = read_detector(ckpt)
    e2e = EndToEnd(src.model, (160, 160), score_thr=0.002, nms_iou=0.6, topk_pre_nms=1000, max_det=100)
    x = torch.randint(0, 256, (1, 3, 160, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    inside = (x.float() - e2e.mean255) * e2e.inv_std255
    assert torch.equal(inside, normalise(x, src.model.mean, src.model.std))


def test_verification_lets_only_rows_of_tied_scores_trade_places():
    from kdctl.export.verify import untie
    from kdctl.models.postprocess import Detections

    def dets(boxes, scores, labels):
        return Detections(batch_index=torch.zeros(len(scores), dtype=torch.long), boxes=torch.tensor(boxes, dtype=torch.float32),
                          scores=torch.tensor(scores), labels=torch.tensor(labels))

    a, b, c = [0.0, 0, 1, 1], [5.0, 5, 6, 6], [9.0, 9, 10, 10]
    ref = dets([a, b, c], [0.5, 0.3, 0.3 + 5e-5], [1, 2, 2])
    swapped = dets([a, c, b], [0.5, 0.3 + 5e-5, 0.3], [1, 2, 2])  # a tie within 1e-4: the same detections
    assert torch.equal(untie(ref, swapped).boxes, ref.boxes)
    unsorted = dets([b, a, c], [0.3, 0.5, 0.3], [2, 1, 2])  # not best first: a real difference, left as is
    assert torch.equal(untie(ref, unsorted).boxes, unsorted.boxes)
    other = dets([a, c, b], [0.5, 0.3, 0.2], [1, 2, 2])  # scores apart: no swap
    assert torch.equal(untie(ref, other).boxes, other.boxes)
