"""`kdctl export --format onnx --int8`: static QDQ quantization of the detector only (decode and
NMS stay float), AP before/after on the checkpoint's val split, and the refusal, with the
numbers, when AP drops by more than --max-ap-drop."""
import re

import onnx
import pytest
import torch
from onnx import helper

from kdctl.evaluation.inference import evaluate_model_file
from kdctl.export import quantize as Q
from kdctl.export.model_file import load_model_file

from helpers import assert_one_line_error, json_of, run, train_tiny_student


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A GFL student (test_resnet, 32 wide) trained 4 steps on 160-px shapes."""
    return train_tiny_student(tmp_path_factory.mktemp("int8") / "run")


def producers(model):
    return {out: node for node in model.graph.node for out in node.output}


def test_int8_end_to_end_quantizes_the_detector_and_leaves_nms_float(ckpt, tmp_path):
    out = tmp_path / "int8.onnx"
    res = json_of(run("export", ckpt, "--format", "onnx", "--end-to-end", "--int8", "--calibration", "shapes",
                      "--calibration-images", "4", "--max-ap-drop", "100", "--out", out, "--runs", "1", "--json"))
    q = res["int8"]
    assert res["dtype"] == "int8" and q["calibration"] == {"data": "shapes", "images": 4, "method": Q.DEFAULT_METHOD}
    assert q["ap"]["fp32"] > 0 and q["ap"]["drop"] == pytest.approx(q["ap"]["fp32"] - q["ap"]["int8"])
    assert q["latency_ms"]["fp32"] > 0 and q["latency_ms"]["int8"] > 0 and res["verify"]["passed"]
    # the file written is the file measured: its AP through kdctl eval's path is the reported one
    m = load_model_file(out)
    assert m.kind == "onnx-end-to-end" and m.meta["dtype"] == "int8"
    assert 100 * evaluate_model_file(m, None, description=None)["metrics"]["AP"] == pytest.approx(q["ap"]["int8"], abs=1e-9)

    graph = onnx.load(str(out))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and "NonMaxSuppression" in ops
    made_by = producers(graph)
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert convs and all(made_by[n.input[1]].op_type == "DequantizeLinear" for n in convs)  # int8 weights
    for node in graph.graph.node:  # decoding, top-k and NMS read float tensors that were not quantized
        if node.op_type in ("NonMaxSuppression", "TopK", "Sigmoid", "Softmax"):
            assert all(made_by[t].op_type != "DequantizeLinear" for t in node.input if t in made_by), node.op_type
    # per-channel weights: int8 initializers with one scale per output channel
    inits = {i.name: i for i in graph.graph.initializer}
    for conv in convs:
        dq = made_by[conv.input[1]]
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [weight.dims[0]]


def test_detector_nodes_stop_at_the_last_convolutions():
    """conv -> relu -> conv -> sigmoid -> topk: the two convs and the relu between them are the
    detector; the sigmoid and top-k after the last conv are not."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"), helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Conv", ["b", "w2"], ["c"], name="c2"), helper.make_node("Sigmoid", ["c"], ["d"], name="s"),
             helper.make_node("TopK", ["d", "k"], ["v", "i"], name="t"), helper.make_node("Relu", ["a"], ["side"], name="side")]
    graph = helper.make_graph(nodes, "g", [], [])
    assert Q.detector_nodes(helper.make_model(graph)) == ["c1", "r", "c2"]


def _blind(real):
    """A quantizer whose graph then scores every class logit 100 lower: no detection passes
    the threshold, AP falls to 0 (the raw graph's cls_* outputs are graph outputs)."""
    def quantize(fp32, out, batches, method=Q.DEFAULT_METHOD):
        n = real(fp32, out, batches, method)
        model = onnx.load(str(out))
        made_by = producers(model)
        for o in model.graph.output:
            if o.name.startswith("cls_"):
                node = made_by[o.name]
                node.output[list(node.output).index(o.name)] = o.name + "_int8"
                model.graph.node.append(helper.make_node("Sub", [o.name + "_int8", "minus100"], [o.name]))
        model.graph.initializer.append(onnx.numpy_helper.from_array(torch.tensor(100.0).numpy(), "minus100"))
        onnx.save(model, str(out))
        return n
    return quantize


def test_int8_refuses_to_write_when_ap_drops_too_much(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(Q, "quantize_onnx", _blind(Q.quantize_onnx))
    out = tmp_path / "blind.onnx"
    res = run("export", ckpt, "--format", "onnx", "--int8", "--calibration", "shapes", "--calibration-images", "2",
              "--max-ap-drop", "0.1", "--out", out, "--runs", "0")
    assert_one_line_error(res, "blind.onnx: INT8 AP 0.0 vs float32", "> --max-ap-drop 0.1; nothing was written")
    fp32, drop = (float(v) for v in re.search(r"float32 ([\d.]+) on the validation split, a drop of ([\d.]+)", res.output).groups())
    assert fp32 > 0.1 and drop == pytest.approx(fp32, abs=0.051)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_int8_options_are_checked_in_one_line(ckpt, tmp_path):
    assert_one_line_error(run("export", ckpt, "--format", "onnx", "--int8", "--out", tmp_path / "x.onnx"),
                          "--int8 needs --calibration DATA")
    assert_one_line_error(run("export", ckpt, "--format", "torchscript", "--int8", "--calibration", "shapes", "--out", tmp_path / "x.pt"),
                          "--int8 applies to --format onnx only")
    assert_one_line_error(run("export", ckpt, "--format", "onnx", "--calibration", "shapes", "--out", tmp_path / "x.onnx"),
                          "--calibration applies to --int8 only")
    assert_one_line_error(run("export", ckpt, "--format", "onnx", "--int8", "--calibration", "shapes", "--calibration-method",
                              "kl", "--out", tmp_path / "x.onnx", "--runs", "0", "--no-verify"),
                          "--calibration-method: expected minmax, entropy, percentile, got 'kl'")
    assert not list(tmp_path.iterdir())


def test_calibration_images_are_letterboxed_like_every_input(ckpt):
    from kdctl.export.source import read_detector

    src = read_detector(ckpt)
    u8 = Q.calibration_batches("shapes", (160, 160), 3, src.model.mean, src.model.std, uint8=True)
    fl = Q.calibration_batches("shapes", (160, 160), 3, src.model.mean, src.model.std, uint8=False)
    assert len(u8) == 3 and u8[0].shape == (1, 3, 160, 160) and u8[0].dtype.name == "uint8" and fl[0].dtype.name == "float32"
    from kdctl.export.model_file import normalise

    assert torch.equal(torch.from_numpy(fl[1]), normalise(torch.from_numpy(u8[1]), src.model.mean, src.model.std))
