"""The yolo family through the rest of kdctl (training and distilling are tests/test_yolo.py's):
eval at the family's NMS IoU, raw and end-to-end ONNX exports verified against PyTorch, the same
detections from `kdctl predict` on the checkpoint and both exports, `kdctl analyze-conflict` with
a yolo student (its task-aligned soft targets, recomputed here) and with a P3-P7 teacher, a
2-process distillation, the 2 x b = 1 x 2b contract of the loss's normaliser, exact resume with
EMA and augmentation on, and `distill.class_map` with a yolo teacher of more classes.

Random-weight checkpoints stand in for trained ones where only the wiring is tested: a few
training steps leave every yolo score at its stride prior (~1e-3 at 64 px, equal to 1e-7), so
detections would tie; these are perturbed to give many distinct, overlapping boxes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torchvision.ops import box_iou

from conftest import ROOT
from helpers import assert_one_line_error, json_of, run
from kdctl.data import build_dataset
from kdctl.data.collate import collate
from kdctl.data.shapes import SHAPE_CLASSES
from kdctl.artifact.checkpoint import load_train_state, save_checkpoint
from kdctl.artifact.stored import load_detector
from kdctl.evaluation.inference import val_transforms
from kdctl.engine.trainer import Trainer
from kdctl.models.detector import build_detector
from kdctl.recipe import load_recipe
from test_predict import same_detections
from test_yolo import TINY, gt_batch, sets, yolo_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

LOCATIONS = 8 * 8 + 4 * 4 + 2 * 2  # P3-P5 of a 64-px image


def side(which: str, width: int = 32, head: str = "yolo") -> list[str]:
    """``test_resnet`` sides ``width`` wide (``yolo={}``: no width multiplier)."""
    extra = [f"model.{which}.yolo={{}}"] if head == "yolo" else [f"model.{which}.head={head}", f"model.{which}.yolo={{}}"]
    return [f"model.{which}.backbone=test_resnet", f"model.{which}.fpn_channels={width}",
            f"model.{which}.feat_channels={width}", *extra]


SMALL = [*TINY, *side("student"), *side("teacher")]


def save_random(folder, which="student", num_classes=10, *, width=32, head="yolo", seed=0):
    """A kdctl checkpoint of a tiny ``head`` detector (recipe yolo-n with :data:`TINY`), its weights
    moved off the initialisation: yolo cls biases -1 (scores ~0.27) and reg predictors giving
    sides of a few strides, so that boxes differ and overlap."""
    recipe = load_recipe("yolo-n", [*TINY, *side("student"), *side("teacher", width, head)])
    torch.manual_seed(seed)
    model = build_detector(getattr(recipe.model, which), num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if head == "yolo":
            for cls, reg in zip(model.head.cls_pred, model.head.reg_pred):
                cls.bias.fill_(-1.0)
                reg.weight.normal_(0.0, 0.3)
                reg.bias.copy_(-0.5 * torch.arange(17.0).repeat(4))
    folder.mkdir(parents=True)
    meta = {"recipe": recipe.to_yaml(), "num_classes": str(num_classes), "classes": "\n".join(SHAPE_CLASSES[:num_classes]),
            "model": which, "format": "kdctl.detector/1"}
    save_checkpoint(folder, "last", model, {}, meta)
    return folder / "last.safetensors"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random(tmp_path_factory.mktemp("yolo") / "student")


@pytest.fixture(scope="module")
def exports(ckpt):
    """The raw (dynamic batch) and end-to-end ONNX exports of :func:`ckpt`, verified, and their reports."""
    files, reports = {}, {}
    for name, args in {"raw": ["--dynamic-batch"], "e2e": ["--end-to-end"]}.items():
        files[name] = ckpt.parent / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports[name] = json_of(run("export", ckpt, "--format", "onnx", *args, "--out", files[name], "--runs", "1",
                                        "--json"))
    return files, reports


# ============================================================================= eval
def test_eval_applies_the_familys_nms_iou_and_reads_an_onnx_export_alike(ckpt, exports, tmp_path):
    res = json_of(run("eval", ckpt, "--json", "-", "--save-predictions", tmp_path / "dets.json"))
    assert res["num_images"] == 4 and res["num_predictions"] == 400  # 100 per image: max_per_image
    dets = json.loads((tmp_path / "dets.json").read_text())
    assert len(dets) == 400 and min(d["score"] for d in dets) >= 0.05
    # class-wise NMS at yolo's 0.7 (not the 0.6 of the other families): same-class pairs overlap
    # up to 0.7 and some beyond 0.6, which NMS at 0.6 would have removed
    worst = 0.0
    for image in {d["image_id"] for d in dets}:
        for k in {d["category_id"] for d in dets}:
            xywh = torch.tensor([d["bbox"] for d in dets if d["image_id"] == image and d["category_id"] == k])
            if len(xywh) > 1:
                xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
                worst = max(worst, float(box_iou(xyxy, xyxy).fill_diagonal_(0).max()))
    assert 0.6 < worst <= 0.7 + 1e-3
    # the raw ONNX export evaluates through onnxruntime to the same metrics
    onnx = json_of(run("eval", exports[0]["raw"], "--json", "-"))
    assert onnx["num_predictions"] == 400
    for key, value in res["metrics"].items():
        assert onnx["metrics"][key] == pytest.approx(value, abs=1e-6), key


# ============================================================================= export
def test_raw_and_end_to_end_onnx_exports_are_verified_with_many_detections(exports):
    _, reports = exports
    raw, e2e = reports["raw"], reports["e2e"]
    assert raw["outputs"] == ["cls_p3", "cls_p4", "cls_p5", "reg_p3", "reg_p4", "reg_p5"]  # P3-P5, no centerness
    for report in (raw, e2e):
        v = report["verify"]
        assert v["passed"] and [c["batch"] for c in v["checks"]] == [1, 2]
        for c in v["checks"]:
            assert c["detections"]["identical"] and c["detections"]["reference"] >= 100 * c["batch"]
    assert max(c["diffs"]["reg_p5"] for c in raw["verify"]["checks"]) <= 1e-4
    baked = e2e["end_to_end"]
    assert (baked["nms_iou"], baked["score_thr"], baked["max_per_image"]) == (0.7, 0.05, 100)


# ============================================================================= predict
def test_predict_gives_the_same_detections_from_checkpoint_raw_and_end_to_end_onnx(ckpt, exports, tmp_path):
    files = {"checkpoint": ckpt, **exports[0]}
    docs = {}
    for name, file in files.items():
        res = json_of(run("predict", file, "--data", "shapes", "--limit", 3, "--conf", 0.2, "--out", tmp_path / name,
                          "--json"))
        assert res["images"] == 3 and res["iou"] == 0.7
        docs[name] = json.loads((tmp_path / name / "predictions.json").read_text())["images"]
    ref = docs["checkpoint"]
    assert sum(len(r["scores"]) for r in ref.values()) > 100
    for name, doc in docs.items():
        for image, r in ref.items():
            assert same_detections(doc[image], r), (name, image)


# ============================================================================= analyze-conflict
def student_args(*extra):
    return ["--student", "yolo-n", *sets(*SMALL), *extra]


def test_conflict_targets_are_the_task_aligned_soft_scores_and_the_teacher_as_its_own_student(ckpt):
    res = run("analyze-conflict", "--teacher", ckpt, *student_args(), "--student-checkpoint", ckpt, "--max-images", 1,
              "--json", "-")
    report = json.loads(res.output)
    assert report["student"]["target"].startswith("TOOD alignment score") and list(report["levels"]) == ["P3", "P4", "P5"]
    (t,) = report["teachers"]
    assert t["target"]["counted"] == t["student"]["counted"] == t["cross"]["counted"] == LOCATIONS
    assert t["student"]["mean_discrepancy"]["all"] == 0.0  # its own predictions
    assert t["cross"]["mean_discrepancy"]["all"] < 1e-4  # CrossKD through its own per-level towers

    # the target conflict recomputed: the assigner sees the checkpoint's predictions, its soft
    # targets (TOOD's normalised metric) against the sigmoid scores, max over classes, mean
    model, _, _ = load_detector(ckpt, device=torch.device("cpu"))
    data = load_recipe("yolo-n", SMALL).data
    batch = collate([build_dataset(data, "val", transforms=val_transforms(data, model.mean, model.std))[0]])
    with torch.no_grad():
        out = model(batch.images)
        flat, priors = model.flat_outputs(out), model.priors(out)
        a = model.assign(priors, batch, flat)
        target = model.detection_loss.cls_targets(a)
    assert a.num_pos > 0 and 0 < target.max() < 1  # soft, not one-hot
    d = (target - flat["cls"].sigmoid()).abs().amax(-1)
    assert t["target"]["mean_discrepancy"]["all"] == pytest.approx(d.mean().item(), rel=1e-5)
    assert t["regression"]["positives"] == a.num_pos.item()


def test_conflict_reads_a_p3_p7_teacher_on_the_yolo_students_levels_and_refuses_the_reverse(tmp_path):
    gfl = save_random(tmp_path / "gfl", "teacher", head="gfl")
    report = json_of(run("analyze-conflict", "--teacher", gfl, *student_args(), "--max-images", 2, "--json", "-"))
    (t,) = report["teachers"]
    assert t["head"] == "gfl" and t["target"]["counted"] == 2 * LOCATIONS
    assert set(t["target"]["by_level"]) == {"P3", "P4", "P5"}
    assert any("P6, P7 (strides [64, 128]) are not compared" in n for n in t["notes"])
    # a P3-P5 yolo teacher has no P6/P7 scores for a GFL student's grid
    teacher = save_random(tmp_path / "yolo", "teacher")
    gfl_student = ["--student", "yolo-n", *sets(*TINY, *side("student", head="gfl"))]
    assert_one_line_error(run("analyze-conflict", "--teacher", teacher, *gfl_student), str(teacher),
                          "needs every student level")


# ============================================================================= distributed
def test_loss_normaliser_is_all_reduced_so_two_halves_give_the_union_batchs_gradients():
    """DDP's contract (tests/test_distributed.py) in one process: each half of a batch averaged
    with the other's normaliser (what ``dist.reduce_mean`` gives each rank), gradients averaged
    over the halves as DDP does, equal the gradients of the whole batch. BatchNorm in eval mode:
    per-rank batch statistics differ by design (sync_bn)."""
    torch.manual_seed(0)
    model = build_detector(yolo_cfg(), 3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    boxes = [[[4.0, 6.0, 40.0, 30.0], [30.0, 20.0, 60.0, 62.0]], [[10.0, 10.0, 50.0, 60.0], [0.0] * 4],
             [[0.0, 0.0, 64.0, 64.0], [8.0, 30.0, 28.0, 50.0]], [[20.0, 4.0, 44.0, 40.0], [0.0] * 4]]
    labels = [[0, 2], [1, -1], [2, 1], [0, -1]]
    images = torch.randn(4, 3, 64, 64)

    def part(idx):
        b = gt_batch([boxes[i] for i in idx], [labels[i] for i in idx])
        b.images = images[idx]
        return b

    def grads(batch, reduce):
        model.zero_grad()
        sum(model.loss(model(batch.images), batch, reduce).values()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole = grads(part([0, 1, 2, 3]), lambda t: t)
    halves = [part([0, 1]), part([2, 3])]
    seen = [[], []]
    for h, batch in enumerate(halves):
        grads(batch, lambda t, h=h: seen[h].append(t.detach().clone()) or t)
    shared = [(x + y) / 2 for x, y in zip(*seen)]
    assert len(shared) == 1 and shared[0] > 1  # one normaliser (the target-score sum), above its clamp at 1
    assert not torch.allclose(seen[0][0], seen[1][0])  # not vacuous: the halves' sums differ
    per_rank = []
    for batch in halves:
        values = iter(shared)
        per_rank.append(grads(batch, lambda t: next(values)))
    assert whole.keys() == per_rank[0].keys() and len(whole) > 20
    for name, g in whole.items():
        torch.testing.assert_close((per_rank[0][name] + per_rank[1][name]) / 2, g, rtol=1e-4, atol=1e-7, msg=name)


def test_two_process_distillation_of_a_yolo_student_from_a_wider_yolo_teacher(tmp_path):
    teacher = save_random(tmp_path / "teacher", "teacher", width=48)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    out = tmp_path / "run"
    overrides = sets(*TINY, *side("student"), "data.batch_size=2", "train.ema.decay=0.8", "train.ema.tau=2")
    proc = subprocess.run([sys.executable, "-m", "kdctl", "distill", "yolo-n", "--teacher", str(teacher), "--nproc", "2",
                           "--method", "crosskd,pkd", "--out", str(out), "--json", *overrides],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["step"] == 2  # 8 images / (2 ranks x 2) per step, 1 epoch
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]  # rank 0 logs each step once
    assert all(k in train[0] for k in ("loss_crosskd_cls", "loss_crosskd_reg", "loss_pkd", "loss_dfl"))
    state = torch.load(out / "last.state.pt", weights_only=True)
    assert any(k.startswith("crosskd.adapters") for k in state["extra"]["kd"])  # 32 -> 48 wide: trained adapters
    weights = load_file(str(out / "last.safetensors"))
    assert "head.cls_pred.2.weight" in weights and not any(k.startswith(("teacher", "crosskd")) for k in weights)
    assert not all(torch.equal(weights[k], v) for k, v in state["ema"]["weights"].items())  # the average is saved


# ============================================================================= resume
def test_resume_with_ema_and_augmentation_is_exact(tmp_path):
    recipe = load_recipe("yolo-n", [*SMALL, "train.epochs=2", "data.augment.close_epochs=1", "data.augment.mosaic=1.0",
                                    "train.ema.decay=0.8", "train.ema.tau=2"])  # 2 epochs x 2 steps, the first augmented
    assert recipe.data.augment is not None and recipe.train.ema is not None
    Trainer(recipe, tmp_path / "full", quiet=True).fit()
    Trainer(recipe, tmp_path / "split", quiet=True, max_steps=1).fit()  # stops inside the augmented epoch
    stopped, done = (load_file(str(tmp_path / run_dir / "last.safetensors")) for run_dir in ("split", "full"))
    assert not all(torch.equal(stopped[k], done[k]) for k in done)
    resumed = Trainer(recipe, tmp_path / "split", quiet=True, resume=True)
    assert resumed.ema.updates == 1
    assert resumed.fit()["step"] == 4
    for name in ("last", "best"):
        full, split = (load_file(str(tmp_path / run_dir / f"{name}.safetensors")) for run_dir in ("full", "split"))
        assert full.keys() == split.keys()
        assert all(torch.equal(full[k], split[k]) for k in full), name
        raw = [load_train_state(tmp_path / run_dir, name, None)["ema"]["weights"] for run_dir in ("full", "split")]
        assert all(torch.equal(raw[0][k], raw[1][k]) for k in raw[0]), name
    assert not all(torch.equal(full[k], raw[0][k]) for k in full)  # the checkpoint holds the average

    def losses(run_dir):
        rows = [json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert losses("split") == losses("full") and len(losses("full")) == 4


# ============================================================================= class map
def test_distill_with_a_yolo_teacher_of_more_classes_maps_its_per_level_classifiers(tmp_path):
    teacher = save_random(tmp_path / "teacher", "teacher", num_classes=10)
    res = run("distill", "yolo-n", "--teacher", teacher, "--method", "crosskd,pred_mimic",
              *sets(*TINY, *side("student"), "data.shapes.num_classes=4", "distill.class_map={circle: star, star: circle}"),
              "--max-steps", 1, "--out", tmp_path / "run", "--json")
    assert json_of(res)["step"] == 1
    plan = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert plan["class_map"] == {"teacher_classes": 10, "map": {"circle": "star", "square": "square",
                                                                 "triangle": "triangle", "star": "circle"}}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(k in train[0] for k in ("loss_crosskd_cls", "loss_mimic_cls"))


def test_end_to_end_export_of_a_barely_trained_checkpoint_passes_verification(tmp_path):
    """Two steps leave every yolo score at its prior (ties within 1e-7, which onnxruntime's
    sigmoid orders differently from PyTorch's): the verification lets tied rows trade places."""
    assert run("train", "yolo-n", *sets(*TINY), "--max-steps", "2", "--out", tmp_path / "run").exit_code == 0
    res = json_of(run("export", tmp_path / "run" / "last.safetensors", "--format", "onnx", "--end-to-end", "--conf",
                      "0.0005", "--out", tmp_path / "e2e.onnx", "--runs", "1", "--json"))
    assert res["verify"]["passed"] and (tmp_path / "e2e.onnx").is_file()
    assert all(c["detections"]["reference"] > 0 for c in res["verify"]["checks"])  # not vacuous: rows to order
