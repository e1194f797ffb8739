"""The family table: every family provides every part, its settings are the official configs',
and everything that lists families (recipe, CLI, docs) is derived from the one dict."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import family_parts
from kdctl.models.assigners import Assigner
from kdctl.models.decoders import SCORE_RULES, BoxDecoder
from kdctl.models.detector import build_detector
from kdctl.models.families import FAMILIES, DetectionLoss, Family, get_family
from kdctl.models.head import DenseHead
from kdctl.recipe import detector_config, RecipeError, validate_raw

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(FAMILIES)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", NAMES)
def test_every_family_provides_every_part(name):
    f = FAMILIES[name]
    assert isinstance(f, Family) and f.name == name and f.summary
    assert issubclass(f.head, DenseHead)
    assert f.norm in ("gn", "bn", "none")
    assert f.fpn_extra is None or (f.fpn_extra[0] in ("c5", "p5") and isinstance(f.fpn_extra[1], bool))
    assert f.anchors is None or (len(f.anchors) == 3 and f.anchors[1] >= 1)
    assert 0 < f.nms_iou <= 1 and f.box_losses and "loss_cls" in f.loss_weights and "loss_bbox" in f.loss_weights
    assert f.assigner and 0 <= f.reuse_idx <= 4 and f.kd.reg_loss in ("kl", "giou", "iou")
    assert f.mmdet_predictors is None or (len(f.mmdet_predictors) == 3 and all(f.mmdet_predictors[:2]))
    # the builders give the parts a detector is made of, from a recipe section alone
    cfg = detector_config(head=name, backbone="test_resnet", fpn_channels=32, feat_channels=32, stacked_convs=2)
    model = build_detector(cfg, num_classes=3)
    assert isinstance(model.head, f.head) and model.family is f
    assert isinstance(model.assigner, Assigner) and isinstance(model.decoder, BoxDecoder)
    assert isinstance(model.detection_loss, DetectionLoss) and model.decoder.score in SCORE_RULES
    # strides from the neck, one per level the head runs on, doubling from P3
    assert model.strides == model.neck.strides and model.strides[0] == 8
    assert all(b == 2 * a for a, b in zip(model.strides, model.strides[1:]))
    assert model.head.num_levels == model.neck.num_outs == len(model.strides)
    # one forward, one loss, one predict: the parts fit together
    images = torch.randn(2, 3, 64, 64)
    batch = SimpleNamespace(images=images, boxes=torch.tensor([[[4.0, 6.0, 40.0, 30.0]], [[10.0, 10.0, 50.0, 60.0]]]),
                            labels=torch.tensor([[0], [2]]), gt_mask=torch.ones(2, 1, dtype=torch.bool),
                            ignore=torch.zeros(2, 0, 4), ignore_mask=torch.zeros(2, 0, dtype=torch.bool),
                            pad_sizes=torch.tensor([[64, 64], [64, 64]]))
    losses = model.loss(model(images), batch)
    assert set(losses) == set(f.loss_weights) and all(torch.isfinite(v) for v in losses.values())
    dets = model.predict(images, torch.tensor([[64, 64], [64, 64]]), torch.ones(2, 2), score_thr=0.0)
    assert dets.boxes.shape[1] == 4


def test_official_settings_per_family():
    """MMDetection's R50 configs (FPN extra convs, test_cfg NMS, loss weights) and CrossKD's
    (reuse_idx, KD weights), one table to read against the configs."""
    got = {n: (f.fpn_extra, f.nms_iou, dict(f.loss_weights), f.reuse_idx, (f.kd.cls_weight, f.kd.reg_weight, f.kd.reg_loss))
           for n, f in FAMILIES.items()}
    assert got == {
        "gfl": (("p5", False), 0.6, {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_dfl": 0.25}, 3, (1.0, 4.0, "kl")),
        "atss": (("p5", False), 0.6, {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_centerness": 1.0}, 3, (1.0, 1.0, "giou")),
        "retinanet": (("c5", False), 0.5, {"loss_cls": 1.0, "loss_bbox": 1.0}, 3, (1.0, 1.0, "giou")),
        "fcos": (("p5", True), 0.5, {"loss_cls": 1.0, "loss_bbox": 1.0, "loss_centerness": 1.0}, 2, (0.4, 0.75, "iou")),
        # not from MMDetection: its own PAN neck, the usual real-time NMS and loss weights, kdctl's reuse_idx
        "yolo": (None, 0.7, {"loss_cls": 0.5, "loss_bbox": 7.5, "loss_dfl": 1.5}, 0, (1.0, 4.0, "kl")),
    }
    assert FAMILIES["atss"].kd.ctr_weight == 1.0 and not FAMILIES["fcos"].kd.mask_invalid
    assert {n: f.norm for n, f in FAMILIES.items()} == {"gfl": "gn", "atss": "gn", "retinanet": "none", "fcos": "gn",
                                                         "yolo": "bn"}
    assert family_parts("retinanet", 3, box_loss="giou").loss.weights["loss_bbox"] == 2.0


def test_recipe_head_choices_come_from_the_table():
    for name in FAMILIES:
        assert validate_raw({"model": {"student": {"head": name}}}, "r").model.student.head == name
    with pytest.raises(RecipeError, match=r"model\.student\.head: unknown detector family 'gfll'; did you mean 'gfl'"):
        validate_raw({"model": {"student": {"head": "gfll"}}}, "r")
    for name, f in FAMILIES.items():  # box_loss choices too
        for box in f.box_losses:
            validate_raw({"model": {"student": {"head": name, "box_loss": box}}}, "r")
    with pytest.raises(RecipeError, match="box_loss 'l1' does not apply to head 'gfl'"):
        validate_raw({"model": {"student": {"head": "gfl", "box_loss": "l1"}}}, "r")
    with pytest.raises(Exception, match="unknown detector family"):
        get_family("yolox")


def test_docs_family_table_lists_every_family():
    """docs/architecture.md's family table has one row per family with its summary."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|", text, flags=re.M)
    assert dict(rows) == {n: f.summary for n, f in FAMILIES.items()}


def test_cli_lists_the_families_from_the_table():
    import json

    from typer.testing import CliRunner

    from kdctl.cli import app

    res = CliRunner().invoke(app, ["recipes", "families", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["head"] for r in rows] == list(FAMILIES)
    assert {r["head"]: (r["summary"], r["crosskd_reuse_idx"], r["capabilities"]) for r in rows} == {
        n: (f.summary, f.reuse_idx, sorted(f.capabilities)) for n, f in FAMILIES.items()}
