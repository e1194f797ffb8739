"""Recipe schema, extends, --set overrides and the one-line errors."""
import pytest
import yaml

from kdctl.errors import RecipeError
from kdctl.recipe import CrossKDLoss, Recipe, apply_override, builtin_recipes, load_recipe


def write(path, text):
    path.write_text(text)
    return path


def error_of(*args, **kw) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(*args, **kw)
    return str(info.value)


def test_defaults_validate():
    r = load_recipe(None)
    assert isinstance(r, Recipe) and r.data.format == "shapes" and r.train.milestones == [8, 11]


def test_every_builtin_recipe_validates():
    names = builtin_recipes()
    assert {"shapes", "coco8", "raccoon", "coco"} <= set(names)
    for name in names:
        load_recipe(name)


def test_unknown_key_names_dotted_path_and_nearest_key(tmp_path):
    f = write(tmp_path / "r.yaml", "data:\n  formt: coco\n")
    msg = error_of(f)
    assert str(f) in msg and "'data.formt'" in msg and "did you mean 'data.format'" in msg


def test_unknown_key_inside_a_tagged_list_item(tmp_path):
    f = write(tmp_path / "r.yaml", "distill:\n  losses:\n    - type: crosskd\n      reuse_idxx: 2\n")
    assert "did you mean 'distill.losses.0.reuse_idx'" in error_of(f)


def test_wrong_type_names_path_and_expected_type(tmp_path):
    f = write(tmp_path / "r.yaml", "train:\n  epochs: ten\n")
    msg = error_of(f)
    assert "train.epochs" in msg and "integer" in msg and "'ten'" in msg


def test_choice_from_table_lists_valid_names(tmp_path):
    f = write(tmp_path / "r.yaml", "model:\n  student:\n    head: ssd\n")
    msg = error_of(f)
    assert "model.student.head" in msg and "'gfl'" in msg and "'fcos'" in msg


def test_unknown_backbone_suggests_a_timm_name(tmp_path):
    f = write(tmp_path / "r.yaml", "model:\n  student:\n    backbone: resnet5O\n")
    assert "did you mean 'resnet50'" in error_of(f)


def test_unknown_distill_method(tmp_path):
    f = write(tmp_path / "r.yaml", "distill:\n  losses:\n    - type: os.system\n")
    assert "distill.losses.0" in error_of(f) and "crosskd" in error_of(f)


def test_yaml_syntax_error_names_line(tmp_path):
    f = write(tmp_path / "r.yaml", "data:\n  format: [shapes\ntrain: {}\n")
    assert f"{f}:" in error_of(f)


def test_python_tags_are_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    f = write(tmp_path / "r.yaml", f"description: !!python/object/apply:os.system ['touch {marker}']\n")
    error_of(f)
    assert not marker.exists()


def test_extends_merges_base_then_child(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  epochs: 24\n  lr: 0.02\ndata:\n  batch_size: 4\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain:\n  lr: 0.005\n")
    r = load_recipe(child)
    assert (r.train.epochs, r.train.lr, r.data.batch_size) == (24, 0.005, 4)


def test_extends_builtin_name_and_cycle(tmp_path):
    child = write(tmp_path / "c.yaml", "extends: raccoon\ntrain:\n  epochs: 3\n")
    r = load_recipe(child)
    assert r.data.format == "voc" and r.train.epochs == 3 and r.model.student.backbone == "resnet18"
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    assert "cycle" in error_of(tmp_path / "a.yaml")


def test_set_overrides_are_typed_and_checked():
    r = load_recipe("shapes", ["train.epochs=2", "train.milestones=[1, 2]", "train.grad_clip=null", "data.hflip=0"])
    assert r.train.epochs == 2 and r.train.milestones == [1, 2] and r.train.grad_clip is None and r.data.hflip == 0
    assert "train.epochs" in error_of("shapes", ["train.epochs=__import__('os')"])
    assert "did you mean 'train.epochs'" in error_of("shapes", ["train.epoch=3"])
    assert "KEY=VALUE" in error_of("shapes", ["train.epochs"])


def test_set_into_list_items():
    r = load_recipe(None, ["distill.losses=[{type: crosskd}, {type: ssim}]", "distill.losses.1.weight=5"])
    assert isinstance(r.distill.losses[0], CrossKDLoss) and r.distill.losses[1].weight == 5
    assert "distill.losses" in error_of(None, ["distill.losses.3.weight=1"])


def test_set_list_index_out_of_range():
    with pytest.raises(RecipeError, match="out of range"):
        apply_override({"distill": {"losses": [{"type": "ssim"}]}}, "distill.losses.3=1")


def test_non_coco_format_requires_path():
    assert "data.path is required" in error_of(None, ["data.format=voc"])


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe("coco8", ["train.epochs=5"])
    f = write(tmp_path / "resolved.yaml", r.to_yaml())
    assert load_recipe(f) == r
    assert yaml.safe_load(r.to_yaml())["data"]["format"] == "yolo"


# ----------------------------------------------------------------------------- family sections
def test_each_head_gets_its_family_section():
    from kdctl.recipe import DetectorConfig, FCOSDetectorConfig, YoloDetectorConfig

    for head, kind in (("gfl", DetectorConfig), ("fcos", FCOSDetectorConfig), ("yolo", YoloDetectorConfig)):
        r = load_recipe(None, [f"model.student.head={head}", f"model.teacher={{head: {head}}}"])
        assert type(r.model.student) is kind and type(r.model.teacher) is kind
    assert type(load_recipe(None).model.student) is DetectorConfig  # no head: gfl
    r = load_recipe(None, ["model.student.head=fcos", "model.student.center_sampling=false"])
    assert r.model.student.center_sampling is False and "yolo" not in r.model.student.model_dump()
    # a recipe written by the new sections reads back to the same
    assert Recipe.model_validate(yaml.safe_load(r.to_yaml())) == r


def test_a_key_of_another_family_names_that_family(tmp_path):
    msg = error_of(None, ["model.student.center_sampling=true"])
    assert "model.student: center_sampling applies to the fcos head only, not 'gfl'; remove it" in msg
    msg = error_of(None, ["model.teacher={head: atss, yolo: {width: 0.5}}"])
    assert "model.teacher: yolo applies to the yolo head only, not 'atss'" in msg
    # keys inside a family section keep their dotted path and "did you mean"
    msg = error_of(None, ["model.student.head=yolo", "model.student.yolo.widht=0.5"])
    assert "unknown key 'model.student.yolo.widht'; did you mean 'model.student.yolo.width'?" in msg
    assert "model.student.yolo.width: expected less than or equal to 4" in error_of(
        None, ["model.student.head=yolo", "model.student.yolo.width=9"])


def test_a_stored_recipe_with_every_familys_defaults_still_reads():
    """kdctl 0.1.0 stored every family's settings in every detector section (``yolo`` with its
    defaults, ``center_sampling: null``): such a section reads, those keys dropped."""
    from kdctl.recipe import YoloConfig, validate_raw

    old = {"head": "gfl", "backbone": "resnet18", "center_sampling": None, "yolo": YoloConfig().model_dump(mode="json")}
    r = validate_raw({"model": {"student": old, "teacher": {**old, "head": "yolo"}}}, "stored")
    assert r.model.student.head == "gfl" and not hasattr(r.model.student, "yolo")
    assert r.model.teacher.yolo == YoloConfig() and not hasattr(r.model.teacher, "center_sampling")


def test_code_builds_a_family_section_by_head():
    from kdctl.recipe import DetectorConfig, YoloDetectorConfig, detector_config

    cfg = detector_config(head="yolo", backbone="resnet18", yolo={"width": 0.25})
    assert isinstance(cfg, YoloDetectorConfig) and cfg.yolo.width == 0.25 and cfg.built_width(256) == 64
    assert detector_config(backbone="resnet18").built_width(256) == 256
    with pytest.raises(ValueError, match="has a section of its own: build it with detector_config"):
        DetectorConfig(head="yolo")
