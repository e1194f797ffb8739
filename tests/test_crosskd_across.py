"""CrossKD between two families (kdctl's extension): a P3-P5 yolo student's neck features through
a P3-P7 GFL teacher's whole head (``reuse_idx`` 0), the losses in the teacher's output space on
the student's levels; which pairs the recipe check accepts and how it refuses the others."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import run
from kdctl.distill.crosskd import align_scale
from kdctl.distill.methods import build_distiller
from kdctl.distill.prediction import prediction_kd
from kdctl.models.families import get_family
from kdctl.recipe import detector_config, load_recipe, pair_problem
from test_yolo import TINY, image_batch, pair, sets

pytestmark = pytest.mark.usefixtures("one_thread")


def crosskd(reuse_idx=0):
    r = load_recipe("shapes", ["distill.losses=[{type: crosskd}]"])
    return [r.distill.losses[0].model_copy(update={"reuse_idx": reuse_idx})]


def cfg(head):
    return detector_config(head=head, backbone="test_resnet", fpn_channels=32, feat_channels=32, stacked_convs=2)


def test_losses_are_the_teachers_own_on_the_students_levels():
    """The cross-head predictions are the teacher head's plain forward on the aligned student
    features of P3-P5; the losses are GFL's KD losses (KD-QFL, distribution KL with weight 4)
    against the teacher's own P3-P5 predictions, with the student's assignment."""
    student, teacher = pair(32, "gfl")
    assert student.strides == [8, 16, 32] and teacher.strides[:3] == [8, 16, 32] and len(teacher.strides) == 5
    d = build_distiller(student, teacher, crosskd())
    d.train()
    b = image_batch()
    losses = d(b)

    s_feats = student.features(b.images)
    with torch.no_grad():
        t_feats = teacher.features(b.images)
        t_out = teacher.head(t_feats[:3])  # the teacher's own predictions on the shared levels
    cross = teacher.head([align_scale(s, t) for s, t in zip(s_feats, t_feats)])  # no adapter: both 32 wide
    s_flat = student.flat_outputs(student.head(s_feats))
    priors = student.priors(student.head(s_feats))
    assignment = student.assign(priors, b, s_flat)
    gfl = get_family("gfl")
    want = prediction_kd(gfl.kd, teacher.decoder, teacher.flat_outputs(cross), teacher.flat_outputs(t_out), priors,
                         assignment, prefix="loss_crosskd")
    assert gfl.kd.reg_weight == 4.0 and get_family("yolo").kd.reg_loss == "kl"
    for name in ("loss_crosskd_cls", "loss_crosskd_reg"):
        torch.testing.assert_close(losses[name], want[name], rtol=1e-5, atol=1e-7)
        assert losses[name] > 0


def test_gradient_reaches_the_students_neck_and_backbone_never_its_head_or_the_teacher():
    student, teacher = pair(64, "gfl")
    d = build_distiller(student, teacher, crosskd())
    assert d.methods["crosskd"].adapters["cls"].weight.shape == (64, 32, 1, 1)  # FPN widths differ: adapters
    d.train()
    losses = d(image_batch())
    (losses["loss_crosskd_cls"] + losses["loss_crosskd_reg"]).backward()

    def has(prefix):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters()
                   if n.startswith(prefix))

    assert has("backbone.") and has("neck.")
    assert not has("head.")  # reuse_idx 0: the student's whole head learns from its detection losses only
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("student, teacher, reuse_idx, expect", [
    ("yolo", "gfl", 0, None),
    ("yolo", "gfl", None, "between two families (student 'yolo', teacher 'gfl') runs the student's neck"),
    ("yolo", "gfl", 1, "set reuse_idx: 0"),
    ("yolo", "retinanet", 0, "needs the same head on both sides (between two families only"),  # 9 anchors, GIoU
    ("yolo", "atss", 0, "needs the same head"),  # GIoU on decoded anchors, centerness
    ("yolo", "fcos", 0, "needs the same head"),  # IoU on decoded points, centerness normaliser
    ("gfl", "yolo", 0, "needs the same head"),  # the teacher has no P6, P7
    ("gfl", "fcos", None, "needs the same head"),
])
def test_which_pairs_the_recipe_check_accepts(student, teacher, reuse_idx, expect):
    problem = pair_problem(cfg(student), cfg(teacher), crosskd(reuse_idx))
    if expect is None:
        assert problem is None
    else:
        assert expect in problem and problem.startswith("distill.losses: crosskd")
    # prediction mimicking compares the two heads' outputs row by row: still the same head only
    mimic = load_recipe("shapes", ["distill.losses=[{type: pred_mimic}]"]).distill.losses
    assert "pred_mimic needs the same head on both sides, but" in pair_problem(cfg(student), cfg(teacher), mimic)


def test_cli_distills_a_yolo_student_from_a_gfl_teacher(tmp_path):
    gfl = ["model.student.head=gfl", "model.student.backbone=test_resnet", "model.student.fpn_channels=32",
           "model.student.feat_channels=32", "model.student.stacked_convs=2", "model.student.yolo={}"]
    res = run("train", "yolo-n", *sets(*TINY, *gfl), "--max-steps", "1", "--out", tmp_path / "gfl")
    assert res.exit_code == 0, res.output
    res = run("distill", "yolo-n", "--teacher", tmp_path / "gfl" / "last.safetensors", "--method", "crosskd",
              *sets(*TINY, "distill.losses.0.reuse_idx=0"), "--max-steps", "2", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(r["loss_crosskd_cls"] > 0 and r["loss_crosskd_reg"] > 0 for r in train)
