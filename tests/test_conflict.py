"""`kdctl analyze-conflict`: the discrepancy statistics on a hand-built case (priors, a GT box,
teacher scores) with a known histogram and conflict ratio, the per-location reduction of a
9-anchor teacher, the GFL quality target against the loss's own, determinism, the PNG outputs
and the command end to end on shapes with tiny random-weight checkpoints."""
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kdctl.analysis.conflict import (
    ConflictStats, RegressionStats, discrepancy, locate, student_targets, teacher_at_locations,
)
from conftest import family_parts
from kdctl.analysis.plot import location_map
from kdctl.cli import app
from kdctl.artifact.checkpoint import save_checkpoint
from kdctl.models.detector import build_detector
from kdctl.models.losses import quality_focal_loss_soft
from kdctl.recipe import load_recipe
from helpers import run

STRIDES = [8, 16, 32, 64, 128]
SIZES = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64 x 64 input: 86 locations
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gt_batch(scale=1.0):
    """One 64 x 64 image with one class-1 box covering it all."""
    return SimpleNamespace(boxes=torch.tensor([[[0.0, 0.0, 64.0, 64.0]]]), labels=torch.tensor([[1]]),
                           gt_mask=torch.tensor([[True]]), ignore=torch.zeros(1, 0, 4),
                           ignore_mask=torch.zeros(1, 0, dtype=torch.bool), valid_sizes=torch.tensor([[64, 64]]),
                           pad_sizes=torch.tensor([[64, 64]]), scales=torch.tensor([[scale, scale]]))


def assigned(head="atss", scale=1.0):
    parts = family_parts(head, 2, STRIDES)
    priors = parts.prior_generator(SIZES, torch.device("cpu"))
    batch = gt_batch(scale)
    a = parts.assigner.assign(priors, batch, 2)
    # ATSS: the 9 P3 anchors (64 px squares) nearest the GT centre (32, 32) plus the nearest of
    # the other levels are candidates; their IoU threshold mean + std falls between the
    # diagonal neighbours' 0.62 and the 4-neighbours' 0.78, so the positives are the P3 anchor at
    # (32, 32) (IoU 1) and its 4 neighbours: rows y * 8 + x.
    assert a.pos_mask[0].nonzero().flatten().tolist() == [28, 35, 36, 37, 44]
    loc = locate(a, priors, 1, batch.valid_sizes, batch.scales, parts.prior_generator.point_offset)
    return parts.loss, priors, a, loc


def teacher_scores():
    """[1, 86, 2] teacher scores (0.01 by default) and the expected discrepancies against a
    one-hot target: centre 0.05, (32, 24) 0.65, other 3 positives 0.25, P3 (0, 0) 0.85 on class
    0, P4 row 70 0.45 on class 1."""
    s = torch.full((1, 86, 2), 0.01)
    s[0, 36, 1] = 0.95
    s[0, 28, 1] = 0.35
    s[0, [35, 37, 44], 1] = 0.75
    s[0, 0, 0] = 0.85
    s[0, 70, 1] = 0.45
    return s


def teacher_boxes():
    b = torch.tensor([0.0, 0.0, 64.0, 64.0]).repeat(1, 86, 1)
    b[0, 36] = torch.tensor([0.0, 0.0, 64.0, 48.0])  # IoU 0.75 with the GT
    return b


def test_hand_built_histogram_and_conflict_ratio():
    crit, _, a, loc = assigned()
    t_scores, t_boxes = teacher_at_locations(teacher_scores(), teacher_boxes(), 1, loc.labels)
    target = student_targets(crit, a, 1)
    assert target.sum() == 5 and torch.equal(target[0, [28, 35, 36, 37, 44], 1], torch.ones(5))
    st = ConflictStats(5, threshold=0.5, floor=0.05)
    st.add(target, t_scores, loc)
    s = st.summary()
    assert s["counted"] == 86 and s["nontrivial"] == 7
    assert s["histogram"]["all"] == [80, 0, 3, 0, 1, 0, 1, 0, 1, 0]
    assert s["histogram"]["nontrivial"] == [1, 0, 3, 0, 1, 0, 1, 0, 1, 0]
    assert s["conflict_ratio"]["all"] == pytest.approx(2 / 86)
    assert s["conflict_ratio"]["nontrivial"] == pytest.approx(2 / 7)
    assert s["mean_discrepancy"]["nontrivial"] == pytest.approx((0.05 + 0.65 + 3 * 0.25 + 0.85 + 0.45) / 7, abs=1e-6)
    assert s["mean_discrepancy"]["all"] == pytest.approx((2.75 + 79 * 0.01) / 86, abs=1e-6)
    p3, p4 = s["by_level"]["P3"], s["by_level"]["P4"]
    assert (p3["counted"], p3["nontrivial"], p3["conflict_ratio"]["nontrivial"]) == (64, 6, pytest.approx(2 / 6))
    assert (p4["counted"], p4["nontrivial"], p4["conflict_ratio"]["nontrivial"]) == (16, 1, 0.0)
    assert s["by_level"]["P7"]["conflict_ratio"]["nontrivial"] is None  # nothing non-trivial there
    # the GT is 64 x 64 = 4096 px² on the original image: medium
    assert s["by_size"]["medium"]["counted"] == 5 and s["by_size"]["medium"]["conflict_ratio"]["all"] == pytest.approx(1 / 5)
    assert s["by_size"]["background"]["counted"] == 81 and s["by_size"]["background"]["conflict_ratio"]["nontrivial"] == 0.5
    assert s["by_size"]["small"]["counted"] == 0 and s["by_size"]["large"]["counted"] == 0

    reg = RegressionStats(5)
    reg.add(t_boxes, loc)
    r = reg.summary()
    assert r["positives"] == 5 and r["mean_iou"] == pytest.approx((4 + 0.75) / 5)
    assert r["histogram"] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 4]
    assert r["by_size"]["medium"]["positives"] == 5 and r["by_level"]["P3"]["mean_iou"] == pytest.approx(0.95)

    # per class: 172 (location, class) units; the same 7 are non-trivial, 2 conflict
    pc = ConflictStats(5, threshold=0.5, floor=0.05, per_class=True)
    pc.add(target, t_scores, loc)
    p = pc.summary()
    assert p["counted"] == 172 and p["nontrivial"] == 7 and p["units"] == "location-class pairs"
    assert p["histogram"]["all"] == [166, 0, 3, 0, 1, 0, 1, 0, 1, 0]
    assert p["conflict_ratio"]["all"] == pytest.approx(2 / 172)

    # a threshold between bins and a higher floor change only what they should
    hi = ConflictStats(5, threshold=0.7, floor=0.5)
    hi.add(target, t_scores, loc)
    h = hi.summary()
    assert h["nontrivial"] == 6 and h["conflict_ratio"]["nontrivial"] == pytest.approx(1 / 6)  # 0.45 is trivial now


def test_original_image_size_decides_the_coco_size():
    crit, _, a, loc = assigned(scale=0.5)  # shown at half size: 128 x 128 = 16384 px² originally
    assert loc.size[0, 36] == 3 and loc.size[0, 0] == 0
    _, _, _, loc = assigned(scale=2.0)  # 32 x 32 = 1024 px²: medium starts at 32², exclusive below
    assert loc.size[0, 36] == 2
    _, _, _, loc = assigned(scale=2.01)
    assert loc.size[0, 36] == 1


def test_nine_anchor_teacher_reduces_to_max_per_location():
    crit, _, a, loc = assigned()
    s1, b1 = teacher_scores(), teacher_boxes()
    s9 = torch.full((1, 86 * 9, 2), 0.01)
    b9 = torch.zeros(1, 86 * 9, 4)
    s9[0, 4::9] = s1[0]  # anchor 4 of every location carries the scores
    s9[0, 36 * 9 + 7, 0] = 0.5  # a higher score on another class and anchor does not pick the box
    b9[0, 4::9] = b1[0]
    scores, boxes = teacher_at_locations(s9, b9, 9, loc.labels)
    expected = s1.clone()
    expected[0, 36, 0] = 0.5
    assert torch.equal(scores, expected)
    assert torch.equal(boxes[0, [28, 35, 36, 37, 44]], b1[0, [28, 35, 36, 37, 44]])


def test_gfl_quality_target_is_the_qfl_target_of_the_loss():
    crit, priors, a, loc = assigned("gfl")
    torch.manual_seed(0)
    out = {"cls": torch.randn(1, 86, 2), "reg": torch.randn(1, 86, 68)}
    boxes = crit.decoder.decode(out["reg"], priors)
    target = crit.cls_targets(a, boxes)
    loss = crit(out, priors, a)["loss_cls"]
    assert loss == pytest.approx(float(quality_focal_loss_soft(out["cls"], target).sum() / 5 * crit.weights["loss_cls"]), rel=1e-5)
    # the teacher's box as the quality: IoU 0.75 at the centre; a teacher scoring 0.75 there agrees
    s = teacher_scores()
    s[0, 36, 1] = 0.75
    t_scores, t_boxes = teacher_at_locations(s, teacher_boxes(), 1, loc.labels)
    q = student_targets(crit, a, 1, t_boxes)
    assert q[0, 36, 1] == pytest.approx(0.75) and q[0, 28, 1] == 1.0
    d, _ = discrepancy(q, t_scores, 0.05)
    assert d[0, 36] == pytest.approx(0.01, abs=1e-6)  # only class 0's 0.01 is left
    assert torch.equal(student_targets(crit, a, 1, None), family_parts("atss", 2, STRIDES).loss.cls_targets(a))


def test_location_map_paints_nearest_prior_centres():
    values = torch.zeros(86)
    values[36] = 1.0  # P3 (x 4, y 4): centre (32, 32), the pixels 28..35 are nearest to it
    m = location_map(values, SIZES, STRIDES, 0.0, 64, 64)
    assert m.shape == (64, 64) and m[32, 32] == 1.0 and m[28, 35] == 1.0 and m[27, 32] == 0.0 and m[32, 36] == 0.0


# ============================================================================= end to end
TINY = ["data.shapes.val_images=6", "data.shapes.image_size=160", "data.short_side=160", "data.max_side=160",
        "data.num_workers=0", "runtime.threads=1", "eval.batch_size=3"]


def tiny_recipe(head="gfl", width=32):
    return load_recipe("shapes", [*TINY, *(f"model.{w}.{k}" for w in ("student", "teacher") for k in (
        "backbone=test_resnet", f"fpn_channels={width}", f"feat_channels={width}", f"head={head}"))])


def save_tiny(folder, head, which="teacher", seed=0):
    """A random-weight checkpoint, perturbed so that its scores are not the init's flat 0.01."""
    folder.mkdir(parents=True)
    recipe = tiny_recipe(head)
    torch.manual_seed(seed)
    model = build_detector(getattr(recipe.model, which), 10)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model.head.cls_pred.bias.data.fill_(-1.0)
    meta = {"recipe": recipe.to_yaml(), "num_classes": "10", "model": which}
    save_checkpoint(folder, "last", model, {}, meta)
    return folder / "last.safetensors"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("conflict")
    return {"gfl": save_tiny(root / "gfl", "gfl"), "retina": save_tiny(root / "retina", "retinanet", seed=1),
            "student": save_tiny(root / "stu", "gfl", "student", seed=2), "root": root}


def student_args():
    sets = [*TINY, "model.student.backbone=test_resnet", "model.student.fpn_channels=32", "model.student.feat_channels=32"]
    return ["--student", "shapes", *(x for s in sets for x in ("--set", s))]


def test_cli_on_shapes_json_plot_visualize_no_overwrite(tmp_path, ckpts):
    out, png, vis = tmp_path / "r.json", tmp_path / "p.png", tmp_path / "vis"
    args = ["analyze-conflict", "--teacher", ckpts["gfl"], "--teacher", ckpts["retina"], *student_args(),
            "--json", out, "--plot", png, "--visualize", 2, "--out", vis]
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert "target conflict" in res.output and "P3" in res.output
    report = json.loads(out.read_text())
    gfl, retina = report["teachers"]
    assert (gfl["head"], gfl["assigns_like_student"], retina["head"], retina["assigns_like_student"]) == ("gfl", True, "retinanet", False)
    assert report["data"]["images"] == 6 and report["student"]["assigner"] == "atss"
    # 160 px: 20² + 10² + 5² + 3² + 2² = 538 locations per image, none ignored (shapes has no ignore regions)
    for t in (gfl, retina):
        g = t["target"]
        assert g["counted"] == 6 * 538 == sum(g["histogram"]["all"])
        assert g["nontrivial"] == sum(g["histogram"]["nontrivial"])
        assert sum(v["counted"] for v in g["by_level"].values()) == g["counted"] == sum(v["counted"] for v in g["by_size"].values())
        assert t["regression"]["positives"] == sum(v["counted"] for k, v in g["by_size"].items() if k != "background") > 0
        assert 0 <= g["conflict_ratio"]["nontrivial"] <= 1
    assert gfl["regression"]["positives"] == retina["regression"]["positives"]  # the student's positives, whatever the teacher
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(png) as im:
        im.verify()
    shots = sorted(vis.glob("conflict_*.png"))
    assert len(shots) == 2 and all(p.read_bytes()[:8] == PNG_MAGIC for p in shots)
    with Image.open(shots[0]) as im:
        assert im.size[0] > 500
    before = out.read_text()
    res = run(*args)
    assert res.exit_code == 2 and "already exists" in res.output and "--force" in res.output
    assert out.read_text() == before
    res = run(*args[:-8], "--visualize", 1, "--out", vis)
    assert res.exit_code == 2 and "conflict_*.png" in res.output
    assert run(*args, "--force").exit_code == 0


def test_cli_is_deterministic_and_independent_of_the_batch_size(ckpts):
    args = ["analyze-conflict", "--teacher", ckpts["retina"], *student_args(), "--max-images", 4, "--json", "-"]
    first = json.loads(run(*args).output)
    assert first == json.loads(run(*args).output)
    # one image per batch: the same counts, and sums equal up to float rounding of the convolutions
    other = json.loads(run(*args, "--batch-size", 1).output)
    for key in ("target", "regression"):
        a, b = flat(other["teachers"][0][key]), flat(first["teachers"][0][key])
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (b[k] if isinstance(b[k], int) or b[k] is None else pytest.approx(b[k], abs=1e-6)), k


def flat(tree, prefix=""):
    """Nested dicts and lists -> {"a.b.0": leaf}."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    return {k: v for key, sub in items for k, v in flat(sub, f"{prefix}.{key}").items()}


def test_cli_student_checkpoint_adds_student_and_cross_head_rows(ckpts):
    res = run("analyze-conflict", "--teacher", ckpts["gfl"], "--teacher", ckpts["retina"], *student_args(),
              "--student-checkpoint", ckpts["student"], "--max-images", 3, "--quality", "student", "--json", "-")
    assert res.exit_code == 0, res.output
    gfl, retina = json.loads(res.output)["teachers"]
    assert gfl["student"]["counted"] == gfl["cross"]["counted"] == 3 * 538
    assert retina["student"]["counted"] == 3 * 538 and retina["cross"] is None
    assert any("a teacher of the student's own family" in n for n in retina["notes"])
    table = run("analyze-conflict", "--teacher", ckpts["gfl"], *student_args(), "--student-checkpoint", ckpts["student"],
                "--max-images", 3)
    assert table.exit_code == 0 and "cross-head predictions" in table.output
    # the teacher as its own student: its predictions are the teacher's, and CrossKD's alignment
    # of a feature to its own statistics is the identity (up to the 1e-6 in the std)
    res = run("analyze-conflict", "--teacher", ckpts["gfl"], *student_args(), "--student-checkpoint", ckpts["gfl"],
              "--max-images", 2, "--json", "-")
    same = json.loads(res.output)["teachers"][0]
    assert same["student"]["mean_discrepancy"]["all"] == 0.0
    assert same["cross"]["mean_discrepancy"]["all"] < 1e-4 and same["cross"]["histogram"]["all"][0] == 2 * 538
    assert any("untrained pairing" in n for n in same["notes"])


def test_cli_errors_are_one_line(tmp_path, ckpts):
    res = run("analyze-conflict", "--teacher", tmp_path / "nope.safetensors", *student_args())
    assert res.exit_code == 2 and "nope.safetensors" in res.output
    res = run("analyze-conflict", "--teacher", ckpts["gfl"], *student_args(), "--quality", "student")
    assert res.exit_code == 2 and "--student-checkpoint" in res.output
    res = run("analyze-conflict", "--teacher", ckpts["gfl"], *student_args(), "--visualize", 2)
    assert res.exit_code == 2 and "--out" in res.output
    res = run("analyze-conflict", "--teacher", ckpts["gfl"], *student_args(), "--data", tmp_path / "none.json")
    assert res.exit_code == 2 and "none.json" in res.output


def test_cli_cross_head_of_wider_teacher_needs_the_trained_adapters(tmp_path, ckpts):
    from kdctl.distill.crosskd import CrossKD

    recipe = load_recipe("shapes", [*TINY, "model.teacher.backbone=test_resnet", "model.teacher.fpn_channels=64",
                                    "model.teacher.feat_channels=64"])
    (tmp_path / "wide").mkdir()
    save_checkpoint(tmp_path / "wide", "last", build_detector(recipe.model.teacher, 10), {},
                    {"recipe": recipe.to_yaml(), "num_classes": "10", "model": "teacher"})
    student = build_detector(tiny_recipe().model.student, 10)
    kd = CrossKD(student.head, build_detector(recipe.model.teacher, 10).head, student.family.kd, student.decoder, 3)
    assert kd.adapters is not None  # 32 -> 64 channels
    (tmp_path / "stu").mkdir()
    save_checkpoint(tmp_path / "stu", "last", student, {"extra": {"kd": {f"crosskd.{k}": v for k, v in kd.state_dict().items()}}},
                    {"recipe": tiny_recipe().to_yaml(), "num_classes": "10", "model": "student"})
    args = ["analyze-conflict", "--teacher", tmp_path / "wide" / "last.safetensors", *student_args(),
            "--student-checkpoint", tmp_path / "stu" / "last.safetensors", "--max-images", 1, "--json", "-"]
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["teachers"][0]["cross"]["counted"] == 538
    (tmp_path / "stu" / "last.state.pt").unlink()
    wide = json.loads(run(*args).output)["teachers"][0]
    assert wide["cross"] is None and any("adapters" in n and "last.state.pt" in n for n in wide["notes"])


def test_command_is_listed_with_an_example():
    assert " analyze-conflict " in run("--help").output
    assert "Example" in run("analyze-conflict", "--help").output
