"""Distilling from a teacher trained on other classes: the class map (by name, explicit, its
one-line errors), the teacher's classifier restricted to the mapped classes (its own predictions
and CrossKD's cross-head path; the yolo head's per-level classifiers too), feature methods with
any teacher, and `kdctl distill` end to end with a 10-class teacher and a 4-class dataset."""
import copy
import json

import pytest
import torch

from kdctl.data import build_dataset
from kdctl.data.shapes import SHAPE_CLASSES
from kdctl.distill.class_map import (
    dataset_classes, plan_teacher_classes, resolve_class_map, restrict_classes,
)
from kdctl.distill.crosskd import CrossKD
from kdctl.distill.methods import build_distiller
from kdctl.distill.trainer import DistillTrainer
from kdctl.engine.trainer import Trainer
from kdctl.errors import KdctlError
from kdctl.models.detector import build_detector
from kdctl.recipe import DataConfig, load_recipe

from test_distill import TINY, batch, losses_of, run, side, tiny

COCO_LIKE = ["person", "bicycle", "traffic light", "hot_dog", "dog", "stop sign"]


def teacher_of(head: str, num_classes: int, seed: int = 0):
    """A tiny teacher of ``head`` predicting ``num_classes`` classes, moved off its initialisation."""
    torch.manual_seed(seed)
    teacher = build_detector(tiny(head=head).model.teacher, num_classes)
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return teacher.requires_grad_(False).eval()


def mapped(cls: torch.Tensor, index: list[int], num_anchors: int) -> torch.Tensor:
    """The channels of ``cls`` ``[B, A*K_t, H, W]`` (anchor-major) of the classes ``index``, for
    every anchor: ``[B, A*K, H, W]``, written out by hand."""
    k_t = cls.shape[1] // num_anchors
    return torch.cat([cls[:, a * k_t + k: a * k_t + k + 1] for a in range(num_anchors) for k in index], dim=1)


def one_line_error(fn, *args) -> str:
    with pytest.raises(KdctlError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# ============================================================================= the restricted teacher
@pytest.mark.parametrize("head, anchors", [("retinanet", 9), ("gfl", 1)])
def test_restricted_teacher_predicts_the_full_heads_mapped_classes_for_every_anchor(head, anchors):
    full = teacher_of(head, 12)
    index = [7, 2, 11, 0]
    small = copy.deepcopy(full)
    restrict_classes(small, index)
    assert small.head.num_anchors == anchors
    assert small.num_classes == small.head.num_classes == 4
    assert small.head.cls_pred.weight.shape[0] == anchors * 4
    images = batch().images
    feats = full.features(images)
    with torch.no_grad():
        want, got = full.head(feats), small.head(feats)
    for level, (w, g) in enumerate(zip(want["cls"], got["cls"])):
        assert g.shape[1] == anchors * 4
        torch.testing.assert_close(g, mapped(w, index, anchors), rtol=0, atol=1e-6, msg=f"level {level}")
    for w, g in zip(want["reg"], got["reg"]):
        assert torch.equal(w, g)
    assert small.flat_outputs(got)["cls"].shape[-1] == 4

    # CrossKD's cross-head path (the student's features through the teacher's forward_from) too
    assert_cross_head_mapped(head, full, small, images, feats, index, anchors)


def assert_cross_head_mapped(head, full, small, images, feats, index, anchors):
    """CrossKD's cross-head predictions (a ``head`` student's features through the teacher's
    ``forward_from``) of the restricted teacher ``small`` equal ``full``'s at the mapped channels."""
    student = build_detector(tiny(head=head).model.student, 4)
    ck = CrossKD(student.head, full.head, student.family.kd, student.decoder, reuse_idx=2)
    _, s_mid = student.head.forward_with_tower(student.features(images), 2)
    _, t_mid = full.head.forward_with_tower(feats, 2)
    with torch.no_grad():
        cross_full = ck.cross_predictions(s_mid, t_mid, full.head)
        cross_small = ck.cross_predictions(s_mid, t_mid, small.head)
    for w, g in zip(cross_full["cls"], cross_small["cls"]):
        torch.testing.assert_close(g, mapped(w, index, anchors), rtol=0, atol=1e-6)


def test_restricted_yolo_teacher_cuts_the_predictor_of_every_level():
    """The yolo head has one cls conv per level (an nn.ModuleList): each is cut to the mapped rows,
    weights and biases copied, with nothing drawn from the random generator; its own and
    CrossKD's cross-head predictions equal the full head's at the mapped channels."""
    full = teacher_of("yolo", 12)
    index = [7, 2, 11, 0]
    small = copy.deepcopy(full)
    convs = small.head.cls_pred
    rng = torch.random.get_rng_state()
    restrict_classes(small, index)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert small.head.cls_pred is convs and len(convs) == small.head.num_levels == 3
    assert small.num_classes == small.head.num_classes == small.detection_loss.num_classes == 4
    for level, conv in enumerate(convs):
        assert conv.weight.shape[0] == conv.bias.shape[0] == 4 and conv.kernel_size == (1, 1)
        assert torch.equal(conv.weight, full.head.cls_pred[level].weight[index])
        assert torch.equal(conv.bias, full.head.cls_pred[level].bias[index])  # the stride-aware prior kept per level
        assert not conv.weight.requires_grad and not conv.training
    images = batch().images
    feats = full.features(images)
    with torch.no_grad():
        want, got = full.head(feats), small.head(feats)
    for w, g in zip(want["cls"], got["cls"]):
        torch.testing.assert_close(g, mapped(w, index, 1), rtol=0, atol=1e-6)
    for w, g in zip(want["reg"], got["reg"]):
        assert torch.equal(w, g)
    assert small.flat_outputs(got)["cls"].shape[-1] == 4
    assert_cross_head_mapped("yolo", full, small, images, feats, index, 1)


def test_restricting_draws_no_random_numbers_and_keeps_the_teacher_frozen():
    teacher = teacher_of("retinanet", 12)
    rng = torch.random.get_rng_state()
    restrict_classes(teacher, [3, 1])
    assert torch.equal(rng, torch.random.get_rng_state())  # the adapters built next init as before
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.head.cls_pred.training
    assert teacher.detection_loss.num_classes == 2


def test_identical_classes_change_nothing():
    names = list(SHAPE_CLASSES[:10])
    assert resolve_class_map(names, names) == list(range(10))
    assert resolve_class_map(names, names, {"circle": "circle"}) == list(range(10))
    teacher = teacher_of("gfl", 10)
    conv, weight = teacher.head.cls_pred, teacher.head.cls_pred.weight.clone()
    restrict_classes(teacher, list(range(10)))
    assert teacher.head.cls_pred is conv and torch.equal(conv.weight, weight) and teacher.num_classes == 10
    plan = plan_teacher_classes({"num_classes": "10", "classes": "\n".join(names)}, None, "t.safetensors",
                                predicts=True, student_classes=names, setting="auto")
    assert plan.index is None and plan.info(names) is None


# ============================================================================= resolving the map
def test_auto_map_matches_names_ignoring_case_and_underscores():
    assert resolve_class_map(["Traffic_Light", "PERSON", "hot dog"], COCO_LIKE) == [2, 0, 3]
    assert resolve_class_map(["dog"], COCO_LIKE, "auto") == [4]
    # an exact name wins over one that only matches after folding
    assert resolve_class_map(["hot_dog"], ["hot dog", "hot_dog"]) == [1]


def test_explicit_map_names_pairs_and_the_other_classes_match_by_name():
    assert resolve_class_map(["lorry", "person"], ["car", "truck", "person"], {"lorry": "truck"}) == [1, 2]
    assert resolve_class_map(["pedestrian", "bike"], COCO_LIKE, {"pedestrian": "person", "Bike": "Bicycle"}) == [0, 1]


def test_a_student_class_without_teacher_class_is_one_line_with_the_nearest_names():
    message = one_line_error(resolve_class_map, ["hotdog", "person", "stopsign", "zebra"], COCO_LIKE, "auto")
    assert "3 dataset class(es) have no class among the teacher's 6" in message
    assert "'hotdog' (nearest: 'hot_dog'" in message
    assert "'stopsign' (nearest: 'stop sign'" in message
    assert "'zebra' (no close name)" in message
    assert "'person'" not in message
    assert "distill.class_map" in message and "feature method" in message


def test_explicit_maps_naming_no_class_or_one_teacher_class_twice_are_one_line():
    message = one_line_error(resolve_class_map, ["car", "person"], COCO_LIKE, {"cat": "dog", "car": "bicycel"})
    assert "'cat' is not a dataset class" in message
    assert "'bicycel' is not a teacher class (nearest: 'bicycle')" in message
    message = one_line_error(resolve_class_map, ["walker", "person"], COCO_LIKE, {"walker": "person"})
    assert "'person' (for 'walker', 'person')" in message and "more than one dataset class" in message


def test_teacher_classes_from_its_checkpoint_metadata():
    meta = {"num_classes": "6", "classes": "\n".join(COCO_LIKE)}
    feature = plan_teacher_classes(meta, None, "t.safetensors", predicts=False, student_classes=None, setting="auto")
    assert (feature.num_classes, feature.index) == (6, None)  # feature methods: nothing matched
    plan = plan_teacher_classes(meta, None, "t.safetensors", predicts=True, student_classes=["Dog", "person"],
                                setting="auto")
    assert plan.index == [4, 0]
    assert plan.info(["Dog", "person"]) == {"teacher_classes": 6, "map": {"Dog": "dog", "person": "person"}}
    with pytest.raises(KdctlError, match=r"^t\.safetensors: distill\.class_map: 1 dataset class"):
        plan_teacher_classes(meta, None, "t.safetensors", predicts=True, student_classes=["zebra"], setting="auto")
    # a checkpoint without names: same count runs as it always has, another count cannot be matched
    assert plan_teacher_classes({"num_classes": "2"}, None, "t", predicts=True, student_classes=["a", "b"],
                                setting="auto").index is None
    with pytest.raises(KdctlError, match="stores no class names"):
        plan_teacher_classes({"num_classes": "6"}, None, "t", predicts=True, student_classes=["a"], setting="auto")
    # names that disagree with the count: only prediction methods read them
    damaged = {"num_classes": "5", "classes": "\n".join(COCO_LIKE)}
    assert plan_teacher_classes(damaged, None, "t", predicts=False, student_classes=None, setting="auto").num_classes == 5
    with pytest.raises(KdctlError, match="predicts 5 classes but its metadata names 6"):
        plan_teacher_classes(damaged, None, "t", predicts=True, student_classes=["dog"], setting="auto")


def test_dataset_classes_without_reading_the_images(tmp_path):
    data = load_recipe("shapes", ["data.shapes.num_classes=4", "data.shapes.train_images=4"]).data
    assert dataset_classes(data) == build_dataset(data, "train").classes == ["circle", "square", "triangle", "star"]
    # COCO: the categories (in id order), whatever the images are (absent, no size)
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "gone.jpg"}], "annotations": [],
                               "categories": [{"id": 7, "name": "star"}, {"id": 3, "name": "circle"}]}))
    assert dataset_classes(DataConfig(format="coco", path=str(ann))) == ["circle", "star"]


# ============================================================================= distiller steps
def test_feature_methods_run_with_a_teacher_of_more_classes():
    student = build_detector(tiny().model.student, 10)
    teacher = teacher_of("fcos", 12)  # other classes, another head: feature methods read the necks only
    d = build_distiller(student, teacher, losses_of("ssim") + losses_of("pkd") + losses_of("feat_l2"))
    losses = d(batch())
    assert {"loss_ssim", "loss_pkd", "loss_feat_l2"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert teacher.num_classes == 12


def test_prediction_methods_run_with_a_restricted_teacher():
    student = build_detector(tiny().model.student, 10)
    teacher = teacher_of("gfl", 12)
    index = resolve_class_map(SHAPE_CLASSES[:10], SHAPE_CLASSES[::-1])  # the teacher's classes reversed
    assert index == list(range(11, 1, -1))
    restrict_classes(teacher, index)
    d = build_distiller(student, teacher, losses_of("crosskd") + losses_of("pred_mimic"))
    losses = d(batch())
    assert {"loss_crosskd_cls", "loss_mimic_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


# ============================================================================= end to end
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A tiny GFL teacher trained one epoch on the 10 shapes classes."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    Trainer(tiny("train.epochs=1"), out, quiet=True, which="teacher").fit()
    return out / "last.safetensors"


def test_distill_trainer_maps_a_4_class_dataset_onto_a_10_class_teacher(tmp_path, teacher_ckpt):
    recipe = tiny(f"model.teacher_checkpoint={teacher_ckpt}", "data.shapes.num_classes=4",
                  "distill.losses=[{type: pred_mimic}, {type: ssim}]")
    parts = DistillTrainer(recipe, tmp_path / "run", quiet=True).parts
    teacher = parts.step.teacher
    assert teacher.num_classes == teacher.head.num_classes == 4
    names = list(SHAPE_CLASSES[:4])
    assert parts.info["class_map"] == {"teacher_classes": 10, "map": dict(zip(names, names))}
    # feature methods alone: the teacher keeps its 10 classes, nothing is mapped
    recipe = tiny(f"model.teacher_checkpoint={teacher_ckpt}", "data.shapes.num_classes=12", "distill.losses=[{type: pkd}]")
    parts = DistillTrainer(recipe, tmp_path / "features", quiet=True).parts
    assert parts.step.teacher.num_classes == 10 and "class_map" not in parts.info


def test_cli_distill_crosskd_from_a_teacher_of_more_classes(tmp_path, teacher_ckpt):
    sets = [x for s in [*TINY, *side("student"), "train.epochs=1", "data.shapes.num_classes=4"] for x in ("--set", s)]
    res = run("distill", "shapes", "--teacher", teacher_ckpt, "--method", "crosskd", *sets, "--out", tmp_path / "r")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "last.safetensors").is_file()


def test_cli_student_class_the_teacher_lacks_is_one_line_before_the_run_directory(tmp_path, teacher_ckpt):
    sets = [x for s in [*TINY, *side("student"), "data.shapes.num_classes=12"] for x in ("--set", s)]
    res = run("distill", "shapes", "--teacher", teacher_ckpt, "--method", "crosskd", *sets, "--out", tmp_path / "r")
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert str(teacher_ckpt) in lines[0] and "'crescent'" in lines[0] and "'pentagon'" in lines[0]
    assert not (tmp_path / "r").exists()
