"""Distillation: the frozen teacher, CrossKD's gradient paths and alignment, each KD loss
against its formula, adapters, what the student's checkpoint holds, resume, pair validation and
`kdctl distill` end to end on shapes and raccoon."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdctl.cli import app
from kdctl.data.collate import collate
from kdctl.distill.crosskd import CrossKD, align_scale
from kdctl.distill.methods import build_distiller
from kdctl.distill.feature import pkd_loss, standardize_channels
from kdctl.distill.prediction import distribution_kl, kd_quality_focal_loss, prediction_kd
from kdctl.distill.trainer import DistillTrainer
from kdctl.engine.trainer import Trainer
from kdctl.errors import KdctlError
from kdctl.models.detector import build_detector
from kdctl.models.families import FAMILIES
from kdctl.recipe import DetectorConfig, RecipeError, load_recipe

from conftest import ROOT, shared
from helpers import run

HEADS = list(FAMILIES)  # every family: a new one is tested by adding it to the table
TINY = [
    "data.shapes.train_images=16", "data.shapes.val_images=8", "data.shapes.image_size=160",
    "data.short_side=160", "data.max_side=160", "data.batch_size=4", "data.num_workers=0",
    "train.epochs=2", "train.warmup_iters=4", "train.log_every=1", "runtime.threads=1",
]


def side(which, width=32, head="gfl", backbone="test_resnet"):
    return [f"model.{which}.backbone={backbone}", f"model.{which}.fpn_channels={width}",
            f"model.{which}.feat_channels={width}", f"model.{which}.stacked_convs=4", f"model.{which}.head={head}"]


def tiny(*extra, head="gfl", teacher_width=32):
    return load_recipe("shapes", [*TINY, *side("student", head=head), *side("teacher", teacher_width, head), *extra])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A tiny GFL teacher, 64 wide (the students are 32: adapters), trained a few steps."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    Trainer(tiny("train.epochs=1", teacher_width=64), out, quiet=True, which="teacher").fit()
    return out / "last.safetensors"


def pair(head="gfl", teacher_width=32, *losses, seed=0):
    torch.manual_seed(seed)
    r = tiny(head=head, teacher_width=teacher_width)
    student = build_detector(r.model.student, 10)
    teacher = build_detector(r.model.teacher, 10)
    for p in teacher.parameters():  # a teacher that is not at its (near-constant) initialisation
        p.data.add_(0.05 * torch.randn_like(p))
    return student, teacher


def batch(n=2, size=160, seed=0):
    from kdctl.data.shapes import ShapesDataset
    from kdctl.data.transforms import build_transforms

    ds = ShapesDataset(n, image_size=size, num_classes=10, seed=seed,
                       transforms=build_transforms(False, short_side=size, max_side=size))
    return collate([ds[i] for i in range(n)])


def losses_of(kind, **opts):
    r = load_recipe("shapes", [f"distill.losses=[{{type: {kind}}}]"])
    return [r.distill.losses[0].model_copy(update=opts)]


# ============================================================================= frozen teacher
def test_teacher_is_frozen_bitwise_unchanged_and_outside_the_checkpoint(tmp_path, teacher_ckpt):
    recipe = tiny(f"model.teacher_checkpoint={teacher_ckpt}", "distill.losses=[{type: crosskd}, {type: ssim}]",
                  "train.epochs=1", teacher_width=64)
    trainer = DistillTrainer(recipe, tmp_path / "run", quiet=True)
    teacher = trainer.parts.step.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    trainer.fit()
    assert not teacher.training  # model.train() each epoch never reaches the teacher
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats included
    # the student's checkpoint: exactly the student's tensors, no teacher, no adapter
    saved = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert set(saved) == set(trainer.model.state_dict())
    assert trainer.parts.extra["crosskd"].adapters is not None  # widths 32 -> 64: adapters were trained
    assert not any(k.startswith(("teacher", "crosskd", "adapters", "features")) for k in saved)


# ============================================================================= CrossKD
@pytest.mark.parametrize("head", HEADS)
def test_forward_with_tower_equals_the_plain_forward(head):
    student, _ = pair(head)
    feats = student.features(batch().images)
    plain = student.head(feats)
    for upto in range(5):
        out, mid = student.head.forward_with_tower(feats, upto)
        for name in plain:
            for a, b in zip(plain[name], out[name]):
                torch.testing.assert_close(a, b)
        assert len(mid["cls"]) == len(feats)


def test_align_scale_matches_its_definition():
    s = torch.randn(3, 4, 5, 6) * 3 + 1
    t = torch.randn(3, 4, 5, 6) * torch.tensor([0.5, 1, 2, 4]).view(1, 4, 1, 1) + torch.arange(4.0).view(1, 4, 1, 1)
    out = align_scale(s, t)
    for c in range(4):
        sc, tc = s[:, c].flatten(), t[:, c].flatten()
        expect = (sc - sc.mean()) / (sc.std(unbiased=True) + 1e-6) * tc.std(unbiased=True) + tc.mean()
        torch.testing.assert_close(out[:, c].flatten(), expect)
        # the result has the teacher's per-channel statistics
        torch.testing.assert_close(out[:, c].mean(), tc.mean(), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, c].std(), tc.std(), atol=1e-4, rtol=1e-4)


# every family at its own reuse_idx (None: the family's), and explicit ones: through part of the
# shared towers (retinanet 3, atss 1), from the neck (gfl 0), part of yolo's per-level towers (2)
@pytest.mark.parametrize("head,reuse_idx", [(h, None) for h in HEADS] + [("retinanet", 3), ("atss", 1), ("gfl", 0),
                                                                         ("yolo", 2)])
def test_crosskd_gradient_reaches_the_student_only_up_to_reuse_idx(head, reuse_idx):
    student, teacher = pair(head)
    d = build_distiller(student, teacher, losses_of("crosskd", reuse_idx=reuse_idx))
    d.train()
    b = batch()
    losses = d(b)
    kd = sum(v for k, v in losses.items() if k.startswith("loss_crosskd"))
    assert torch.isfinite(kd) and kd > 0
    kd.backward()
    idx = FAMILIES[head].reuse_idx if reuse_idx is None else reuse_idx
    grads = {n: p.grad for n, p in student.named_parameters()}

    def has(prefix):
        return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))

    assert has("backbone.") and has("neck.")
    # shared towers: block i is head.<branch>_tower.<i>; per-level ones (yolo): head.<branch>_tower.<level>.<i>
    levels = range(student.head.num_levels) if student.head.per_level else [None]
    for branch in ("cls", "reg"):
        for level in levels:
            for i in range(student.head.num_blocks):
                prefix = f"head.{branch}_tower.{i}." if level is None else f"head.{branch}_tower.{level}.{i}."
                assert any(n.startswith(prefix) for n in grads), prefix  # the block exists under this name
                assert has(prefix) == (i < idx), (branch, level, i, idx)
    for name in ("head.cls_pred", "head.reg_pred", "head.centerness_pred", "head.scales"):
        assert not has(name), name
    assert all(p.grad is None for p in teacher.parameters())


def test_crosskd_cross_head_predictions_are_the_teachers_head_on_aligned_features():
    student, teacher = pair("gfl")
    ck = CrossKD(student.head, teacher.head, student.family.kd, student.decoder, reuse_idx=3)
    feats_s, feats_t = student.features(batch().images), teacher.features(batch().images)
    _, s_mid = student.head.forward_with_tower(feats_s, 3)
    _, t_mid = teacher.head.forward_with_tower(feats_t, 3)
    cross = ck.cross_predictions(s_mid, t_mid, teacher.head)
    level = 1
    x = align_scale(s_mid["cls"][level], t_mid["cls"][level])
    x = F.relu(x)
    x = F.relu(teacher.head.cls_tower[3](x))
    torch.testing.assert_close(cross["cls"][level], teacher.head.cls_pred(x))


def test_heterogeneous_widths_use_adapters_and_they_learn():
    student, teacher = pair("gfl", 64)
    d = build_distiller(student, teacher, losses_of("crosskd", reuse_idx=2) + losses_of("pkd"))
    crosskd, pkd = d.methods.values()
    assert crosskd.adapters["cls"].weight.shape == (64, 32, 1, 1)
    assert pkd.adapters["0"].weight.shape == (64, 32, 1, 1)
    losses = d(batch())
    sum(losses.values()).backward()
    assert crosskd.adapters["reg"].weight.grad.abs().sum() > 0
    assert pkd.adapters["4"].weight.grad.abs().sum() > 0
    # equal widths: no adapter unless asked for
    s2, t2 = pair("gfl", 32)
    assert build_distiller(s2, t2, losses_of("crosskd")).methods["crosskd"].adapters is None
    assert build_distiller(s2, t2, losses_of("crosskd", adapter=True)).methods["crosskd"].adapters is not None


# ============================================================================= loss formulas
def test_kd_quality_focal_loss_formula():
    p, t = torch.tensor([[0.3, -2.0]]), torch.tensor([[1.0, -1.0]])
    sp, st = torch.sigmoid(p), torch.sigmoid(t)
    bce = -(st * torch.log(sp) + (1 - st) * torch.log(1 - sp))
    torch.testing.assert_close(kd_quality_focal_loss(p, t, beta=1.0), bce * (sp - st).abs())
    torch.testing.assert_close(kd_quality_focal_loss(p, t, beta=2.0), bce * (sp - st).abs() ** 2)
    assert kd_quality_focal_loss(t, t).abs().max() < 1e-7  # nothing to learn where they agree


def test_distribution_kl_formula_and_temperature():
    p, t = torch.randn(3, 4, 17), torch.randn(3, 4, 17)
    for T in (1.0, 4.0):
        q, pt = F.softmax(p / T, -1), F.softmax(t / T, -1)
        expect = (pt * (pt.log() - q.log())).sum(-1) * T * T
        torch.testing.assert_close(distribution_kl(p, t, T), expect, atol=1e-6, rtol=1e-5)
    assert distribution_kl(t, t).abs().max() < 1e-6


@pytest.mark.parametrize("head", HEADS)
def test_prediction_kd_against_a_direct_computation(head):
    student, teacher = pair(head)
    b = batch()
    s_out, t_out = student(b.images), teacher(b.images)
    pri = student.priors(s_out)
    a = student.assign(pri, b)
    sp, tp = student.flat_outputs(s_out), teacher.flat_outputs(t_out)
    spec = FAMILIES[head].kd
    got = prediction_kd(spec, student.decoder, sp, tp, pri, a, prefix="kd", weight=2.0)
    valid = (a.labels >= 0).float() if spec.mask_invalid else torch.ones_like(a.labels, dtype=torch.float)
    w = tp["cls"].amax(-1).sigmoid() * valid
    # the reference follows the family's spec (and decoder), not its name: a new family is covered by its record
    if spec.norm == "centerness":  # FCOS: the positives' centerness-target sum
        from kdctl.models.coders import bbox2distance
        from kdctl.models.losses import centerness_target

        per_pos = [centerness_target(bbox2distance(pri.points[a.pos_mask[i]], a.boxes[i][a.pos_mask[i]]))
                   for i in range(len(a.boxes))]
        norm = max(float(sum(c.sum() for c in per_pos)), 1e-6)
    else:
        norm = max(float(a.num_pos), 1.0)
    s_sig, t_sig = sp["cls"].sigmoid(), tp["cls"].sigmoid()
    qfl = F.binary_cross_entropy_with_logits(sp["cls"], t_sig, reduction="none") * (s_sig - t_sig).abs()
    cls = (qfl * valid[..., None]).sum() / norm
    torch.testing.assert_close(got["kd_cls"], 2.0 * spec.cls_weight * cls, rtol=1e-4, atol=1e-7)
    if spec.reg_loss == "kl":  # GFL, yolo: KL of the distance distributions over the decoder's bins
        bins = student.decoder.reg_max + 1
        assert bins == 17  # reg_max 16, kdctl's convention for the distribution families (gfl, yolo)
        assert sp["reg"].shape[-1] == tp["reg"].shape[-1] == 4 * bins
        kl = distribution_kl(sp["reg"].unflatten(-1, (4, bins)), tp["reg"].unflatten(-1, (4, bins)))
        reg = (kl * w[..., None]).sum() / 4.0 / w.sum()
    else:
        from kdctl.models.losses import giou_loss, iou_loss

        pb, tb = student.decoder.decode(sp["reg"], pri), student.decoder.decode(tp["reg"], pri)
        per = giou_loss(pb, tb) if spec.reg_loss == "giou" else iou_loss(pb, tb)
        reg = (per * w).sum() / norm
    torch.testing.assert_close(got["kd_reg"], 2.0 * spec.reg_weight * reg, rtol=1e-4, atol=1e-7)
    if spec.ctr_weight:  # ATSS: centerness KD on the positives
        bce = F.binary_cross_entropy_with_logits(sp["centerness"], tp["centerness"].sigmoid(), reduction="none")[..., 0]
        torch.testing.assert_close(got["kd_ctr"], 2.0 * spec.ctr_weight * (bce * a.pos_mask).sum() / norm,
                                   rtol=1e-4, atol=1e-7)
    else:
        assert "kd_ctr" not in got


def test_pkd_l2_l1_formulas():
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5) * 5 + 2
    z = standardize_channels(s)
    for c in range(3):
        assert abs(float(z[:, c].mean())) < 1e-5 and abs(float(z[:, c].std()) - 1) < 1e-4
    torch.testing.assert_close(pkd_loss(s, t), ((standardize_channels(s) - standardize_channels(t)) ** 2).mean() / 2)
    # PKD is invariant to a per-channel affine change of either side
    torch.testing.assert_close(pkd_loss(3 * s + 1, t), pkd_loss(s, t), atol=1e-5, rtol=1e-4)
    student, teacher = pair("gfl")
    b = batch()
    fs, ft = student.features(b.images), teacher.features(b.images)
    for kind, fn in (("feat_l2", lambda x, y: ((x - y) ** 2).mean()), ("feat_l1", lambda x, y: (x - y).abs().mean()),
                     ("pkd", pkd_loss)):
        d = build_distiller(student, teacher, losses_of(kind, weight=3.0))
        got = d.methods[kind].feature_loss(fs, ft)[f"loss_{kind}"]
        torch.testing.assert_close(got, 3.0 * sum(fn(x, y) for x, y in zip(fs, ft)), rtol=1e-5, atol=1e-6)


def test_ssim_feature_method_sums_levels():
    from kdctl.distill.ssim import ssim_feature_loss

    student, teacher = pair("gfl")
    b = batch()
    fs, ft = student.features(b.images), teacher.features(b.images)
    d = build_distiller(student, teacher, losses_of("ssim", weight=2.0))
    got = d.methods["ssim"].feature_loss(fs, ft)["loss_ssim"]
    torch.testing.assert_close(got, 2.0 * sum(ssim_feature_loss(x, y) for x, y in zip(fs, ft)))
    assert 0 < float(got.detach()) < 2.0 * 5


# ============================================================================= validation
def test_pairs_that_cannot_cross_fail_at_validation():
    with pytest.raises(RecipeError, match="crosskd needs the same head.*'gfl'.*'fcos'"):
        tiny("distill.losses=[{type: crosskd}]", "model.teacher.head=fcos")
    with pytest.raises(RecipeError, match="pred_mimic needs the same head"):
        tiny("distill.losses=[{type: pred_mimic}]", "model.teacher.head=atss")
    with pytest.raises(RecipeError, match="reuse_idx 6 is past the head towers"):
        tiny("distill.losses=[{type: crosskd, reuse_idx: 6}]")
    with pytest.raises(RecipeError, match="adapter false needs equal widths"):
        tiny("distill.losses=[{type: pkd, adapter: false}]", teacher_width=64)
    with pytest.raises(RecipeError, match="appears more than once"):
        tiny("distill.losses=[{type: ssim}, {type: ssim}]")
    # feature methods work across head types
    tiny("distill.losses=[{type: ssim}, {type: pkd}]", "model.teacher.head=fcos")


def test_missing_teacher_weights_is_a_clear_error(tmp_path):
    with pytest.raises(KdctlError, match="model.teacher has no weights"):
        DistillTrainer(tiny("distill.losses=[{type: crosskd}]"), tmp_path / "run", quiet=True)


def test_cli_teacher_checkpoint_of_another_head_is_one_line(tmp_path, teacher_ckpt):
    sets = [x for s in TINY + side("student", head="fcos") for x in ("--set", s)]
    res = run("distill", "shapes", "--teacher", teacher_ckpt, "--method", "crosskd", *sets, "--out", tmp_path / "r")
    assert res.exit_code == 2
    # an fcos student of a gfl teacher: CrossKD crosses the two families only from the neck
    assert "crosskd between two families" in res.output and "set reuse_idx: 0" in res.output
    assert str(teacher_ckpt) in res.output
    assert not (tmp_path / "r").exists()
    res = run("distill", "shapes", "--method", "crosskd,bogus", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "unknown method 'bogus'" in res.output


# ============================================================================= end to end
def test_distill_resume_is_exact_with_adapters(tmp_path, teacher_ckpt):
    recipe = tiny(f"model.teacher_checkpoint={teacher_ckpt}", "distill.losses=[{type: crosskd}, {type: feat_l2}]",
                  teacher_width=64)
    DistillTrainer(recipe, tmp_path / "full", quiet=True).fit()
    DistillTrainer(recipe, tmp_path / "split", quiet=True, max_steps=6).fit()
    DistillTrainer(recipe, tmp_path / "split", quiet=True, resume=True).fit()
    a, b = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(tmp_path / "split" / "last.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_distill_every_method_then_eval_and_compare(tmp_path, teacher_ckpt):
    sets = [x for s in TINY + side("student") + ["train.epochs=1"] for x in ("--set", s)]
    res = run("distill", "shapes", "--teacher", teacher_ckpt, "--method",
              "crosskd,ssim,pkd,feat_l2,feat_l1,pred_mimic", *sets, "--out", tmp_path / "all", "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "plan" and [m["type"] for m in rows[0]["methods"]] == [
        "crosskd", "ssim", "pkd", "feat_l2", "feat_l1", "pred_mimic"]
    rows = [r for r in rows if r["kind"] != "plan"]
    logged = set(rows[0])
    for name in ("loss_crosskd_cls", "loss_crosskd_reg", "loss_ssim", "loss_pkd", "loss_feat_l2", "loss_feat_l1",
                 "loss_mimic_cls", "loss_mimic_reg", "loss_cls", "loss_bbox", "loss_dfl"):
        assert name in logged, name
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    res = run("distill", "shapes", "--method", "none", *sets, "--out", tmp_path / "none")
    assert res.exit_code == 0, res.output
    res = run("eval", tmp_path / "all" / "best.safetensors", "--json", "-")
    assert res.exit_code == 0, res.output
    res = run("compare", tmp_path / "none", tmp_path / "all", "--json")
    summary = json.loads(res.output)
    assert [r["distill"] for r in summary] == ["none", "crosskd,ssim,pkd,feat_l2,feat_l1,pred_mimic"]
    assert all(r["train_s"] > 0 for r in summary)


def test_distill_on_raccoon(tmp_path, monkeypatch):
    shared("raccoon-voc")
    monkeypatch.chdir(ROOT)  # the built-in recipes name ../shared/data relative to the repository
    base = ["data.short_side=96", "data.max_side=128", "data.batch_size=4", "data.num_workers=0",
            "runtime.threads=1", "train.epochs=1", *side("student", 32), *side("teacher", 64)]
    sets = [x for s in base for x in ("--set", s)]
    res = run("train", "raccoon", "--model", "teacher", *sets, "--max-steps", "2", "--out", tmp_path / "teacher")
    assert res.exit_code == 0, res.output
    res = run("distill", "raccoon", "--teacher", tmp_path / "teacher" / "last.safetensors", "--method",
              "crosskd,ssim,pkd,feat_l2,feat_l1,pred_mimic", *sets, "--max-steps", "2", "--out", tmp_path / "student")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "student" / "last.safetensors").is_file()
