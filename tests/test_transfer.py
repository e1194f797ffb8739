"""Transfer initialisation (``model.*.init_from``): what fits loads, classifier rows follow the
classes by name for every anchor, bad class maps and misfitting checkpoints are one-line errors,
fetch names resolve through the cache, and ``kdctl train`` runs from a transferred start."""
import json

import pytest
import torch
from typer.testing import CliRunner

from kdctl.cli import app
from kdctl.artifact.checkpoint import load_checkpoint_weights, save_checkpoint
from kdctl.engine.transfer import build_with_weights
from kdctl.errors import KdctlError, RecipeError
from kdctl.models.detector import build_detector
from kdctl.recipe import DetectorConfig, detector_config, ModelConfig, Recipe, load_recipe

CKPT_CLASSES = ["person", "traffic_light", "Dog", "cat", "stop sign"]
DATASET = ["cat", "Traffic Light", "giraffe", "dog"]  # fewer classes, another order, case and "_" vs " "
# worked by hand: dataset index -> checkpoint index ("giraffe" has no match)
BY_NAME = {0: 3, 1: 1, 3: 2}
CLS = ("head.cls_pred.weight", "head.cls_pred.bias")


def tiny(head="retinanet", backbone="test_resnet", **extra) -> DetectorConfig:
    return detector_config(head=head, backbone=backbone, fpn_channels=32, feat_channels=32, stacked_convs=2, **extra)


def write_checkpoint(folder, cfg, classes, name="last", scramble=True):
    """A kdctl checkpoint of ``cfg`` for ``classes`` in ``folder``; with ``scramble`` every
    floating tensor is random, so that nothing equals a fresh initialisation by chance (zero
    biases, the prior-probability bias, unit norm weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(123)
    model = build_detector(cfg, len(classes))
    if scramble:
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.randn_like(t))
    meta = {"recipe": Recipe(model=ModelConfig(student=cfg)).to_yaml(), "num_classes": str(len(classes)),
            "classes": "\n".join(classes)}
    save_checkpoint(folder, name, model, {}, meta)
    return folder / f"{name}.safetensors"


def build_pair(cfg, classes, seed=7):
    """(the transferred model, its report, the same model freshly initialised): both built from
    the same seed, so rows that were not copied must equal the fresh ones bit for bit."""
    torch.manual_seed(seed)
    fresh = build_detector(cfg.model_copy(update={"init_from": None}), len(classes))
    torch.manual_seed(seed)
    model, report = build_with_weights(cfg, classes)
    return model, report, fresh


def assert_rows(model, fresh, ckpt, pairs, anchors, k_mine, k_ckpt):
    """Every anchor's row of each mapped class is the checkpoint's; every other class's is fresh."""
    for key in CLS:
        got, new, theirs = model.state_dict()[key], fresh.state_dict()[key], ckpt[key]
        assert got.shape[0] == anchors * k_mine
        for a in range(anchors):
            for k in range(k_mine):
                want = theirs[a * k_ckpt + pairs[k]] if k in pairs else new[a * k_mine + k]
                assert torch.equal(got[a * k_mine + k], want), (key, a, k)


@pytest.mark.parametrize("head,anchors", [("retinanet", 9), ("gfl", 1)])
def test_class_rows_follow_names_for_every_anchor_and_the_rest_loads(tmp_path, head, anchors):
    path = write_checkpoint(tmp_path / "src", tiny(head), CKPT_CLASSES)
    model, report, fresh = build_pair(tiny(head, init_from=str(path)), DATASET)
    ckpt, _ = load_checkpoint_weights(path)
    assert model.head.num_anchors == anchors
    assert_rows(model, fresh, ckpt, BY_NAME, anchors, len(DATASET), len(CKPT_CLASSES))
    for key, value in model.state_dict().items():
        if key not in CLS:
            assert torch.equal(value, ckpt[key]), key
    state = model.state_dict()
    assert report == {
        "source": str(path), "loaded": len(state) - 2, "reinitialised": 2, "ignored": 0,
        "first_loaded": list(state)[:3], "first_reinitialised": list(CLS), "first_ignored": [],
        "class_rows": {"mapped": 3, "of": 4, "map": {"cat": "cat", "Traffic Light": "traffic_light", "dog": "Dog"}},
    }
    json.dumps(report)


def test_identical_classes_load_the_classifier_whole_and_a_run_directory_means_last(tmp_path):
    write_checkpoint(tmp_path / "run", tiny(), CKPT_CLASSES)
    model, report, _ = build_pair(tiny(init_from=str(tmp_path / "run")), CKPT_CLASSES)
    ckpt, _ = load_checkpoint_weights(tmp_path / "run")
    assert all(torch.equal(v, ckpt[k]) for k, v in model.state_dict().items())
    assert report["loaded"] == len(ckpt) and report["reinitialised"] == 0 and "class_rows" not in report


def test_explicit_pairs_win_the_rest_match_by_name_and_none_copies_nothing(tmp_path):
    """As distill.class_map (kdctl.classes.map_classes): the dict's pairs, then the names."""
    path = write_checkpoint(tmp_path / "src", tiny(), CKPT_CLASSES)
    ckpt, _ = load_checkpoint_weights(path)
    model, report, fresh = build_pair(tiny(init_from=str(path), init_class_map={"giraffe": "stop sign"}), DATASET)
    assert_rows(model, fresh, ckpt, {0: 3, 1: 1, 2: 4, 3: 2}, 9, 4, 5)
    assert report["class_rows"]["map"] == {"cat": "cat", "Traffic Light": "traffic_light", "giraffe": "stop sign", "dog": "Dog"}

    model, report, fresh = build_pair(tiny(init_from=str(path), init_class_map="none"), DATASET)
    assert_rows(model, fresh, ckpt, {}, 9, 4, 5)
    assert report["class_rows"] == {"mapped": 0, "of": 4, "map": {}}
    assert torch.equal(model.state_dict()["head.reg_pred.weight"], ckpt["head.reg_pred.weight"])


def test_a_map_covering_every_class_counts_the_classifier_as_loaded(tmp_path):
    path = write_checkpoint(tmp_path / "src", tiny("gfl"), CKPT_CLASSES)
    _, report, _ = build_pair(tiny("gfl", init_from=str(path)), ["Dog", "person"])
    assert report["reinitialised"] == 0 and report["class_rows"]["mapped"] == 2


@pytest.mark.parametrize("class_map,named", [
    ({"girafe": "person"}, ["'girafe'", "dataset", "'giraffe'"]),
    ({"giraffe": "persn"}, ["'persn'", "checkpoint", "'person'"]),
    ({"cat": "cat", "dog": "cat"}, ["'cat' (for 'cat', 'dog')", "more than one dataset class"]),
])
def test_bad_class_maps_are_one_line_errors(tmp_path, class_map, named):
    path = write_checkpoint(tmp_path / "src", tiny(), CKPT_CLASSES)
    with pytest.raises(KdctlError) as err:
        build_with_weights(tiny(init_from=str(path), init_class_map=class_map), DATASET)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "init_class_map" in text
    assert all(word in text for word in named), text


def test_a_checkpoint_of_another_backbone_is_refused_naming_both(tmp_path):
    path = write_checkpoint(tmp_path / "src", tiny(backbone="test_efficientnet"), CKPT_CLASSES)
    with pytest.raises(KdctlError) as err:
        build_with_weights(tiny(init_from=str(path)), DATASET)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "almost nothing fits" in text
    assert "retinanet on test_efficientnet" in text and "retinanet on test_resnet" in text
    assert "backbone.body.bn1.weight [24] vs [32]" in text  # the first reshaped key, file vs model


def test_another_family_on_the_same_backbone_loads_what_fits(tmp_path):
    """RetinaNet -> GFL: backbone, neck and tower convs fit; GFL's towers have GroupNorm and no
    conv bias, its classifier has 1 anchor, not 9: those stay fresh, the biases are ignored."""
    path = write_checkpoint(tmp_path / "src", tiny("retinanet"), CKPT_CLASSES)
    model, report, fresh = build_pair(tiny("gfl", init_from=str(path)), DATASET)
    ckpt, _ = load_checkpoint_weights(path)
    state = model.state_dict()
    assert torch.equal(state["head.cls_tower.0.0.weight"], ckpt["head.cls_tower.0.0.weight"])
    assert torch.equal(state["head.cls_pred.weight"], fresh.state_dict()["head.cls_pred.weight"])
    assert report["class_rows"] == {"mapped": 0, "of": 4, "map": {}}
    assert "head.cls_tower.0.0.bias" in report["first_ignored"]
    assert report["loaded"] + report["reinitialised"] == len(state)


def test_weights_and_init_from_together_are_a_recipe_error():
    with pytest.raises(RecipeError) as err:
        load_recipe("shapes", ["model.student.weights=a.safetensors", "model.student.init_from=b.safetensors"])
    text = str(err.value)
    assert "\n" not in text and "model.student" in text and "weights and init_from" in text


def test_class_map_setting_is_checked_in_the_recipe():
    with pytest.raises(RecipeError, match="init_class_map: expected 'auto', 'none' or a mapping"):
        load_recipe("shapes", ["model.student.init_class_map=bynames"])
    recipe = load_recipe("shapes", ["model.student.init_class_map={0: person, circle: Dog}"])
    assert recipe.model.student.init_class_map == {"0": "person", "circle": "Dog"}  # YAML's int key is a name


def test_a_fetch_name_resolves_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCTL_HOME", str(tmp_path))
    path = write_checkpoint(tmp_path / "teachers", tiny(), CKPT_CLASSES, name="my_teacher")
    _, report, _ = build_pair(tiny(init_from="my_teacher"), DATASET)
    assert report["source"] == str(path) and report["class_rows"]["mapped"] == 3
    with pytest.raises(KdctlError) as err:
        build_with_weights(tiny(init_from="no_such_teacher"), DATASET)
    assert "\n" not in str(err.value) and "kdctl fetch" in str(err.value) and "no_such_teacher" in str(err.value)
    with pytest.raises(KdctlError, match=r"^init_from: .*missing\.safetensors: no such checkpoint"):
        build_with_weights(tiny(init_from=str(tmp_path / "missing.safetensors")), DATASET)


def test_an_uncached_registry_name_is_fetched(tmp_path, monkeypatch):
    from kdctl.hub import fetch as fetch_module
    from kdctl.hub.registry import TEACHERS

    name = next(iter(TEACHERS))
    monkeypatch.setenv("KDCTL_HOME", str(tmp_path))
    calls = []

    def fake_fetch(target):  # what kdctl fetch leaves: a converted checkpoint in the cache
        calls.append(target)
        return {"name": target, "path": str(write_checkpoint(tmp_path / "teachers", tiny(), CKPT_CLASSES, name=target))}

    monkeypatch.setattr(fetch_module, "fetch", fake_fetch)
    _, report, _ = build_pair(tiny(init_from=name), DATASET)
    assert calls == [name] and report["source"] == str(tmp_path / "teachers" / f"{name}.safetensors")


def test_cli_train_starts_from_a_transferred_checkpoint(tmp_path):
    from test_train import TINY

    source = tiny("gfl")
    path = write_checkpoint(tmp_path / "src", source, ["Square", "circle", "moon"], scramble=False)
    sets = [*TINY, "train.epochs=1", "data.shapes.train_images=4", "data.shapes.val_images=2",
            "data.shapes.num_classes=3", f"model.student.init_from={path}"]
    args = ["train", "shapes", *[x for s in sets for x in ("--set", s)], "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    _, meta = load_checkpoint_weights(tmp_path / "run" / "last.safetensors")
    assert f"init_from: {path}" in meta["recipe"]
    plan = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]
    assert '"map": {"circle": "circle", "square": "Square"}' in plan  # shapes' first 3 classes: circle, square, triangle
