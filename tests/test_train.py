"""The training engine end to end on tiny models: loss goes down, one image overfits, resume is
exact, deterministic runs repeat, non-finite losses abort cleanly, and the CLI trains and
evaluates on shapes, COCO8 and raccoon."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdctl.cli import app
from kdctl.data.collate import collate
from kdctl.data.shapes import ShapesDataset
from kdctl.data.transforms import build_transforms
from kdctl.artifact.checkpoint import load_checkpoint_weights
from kdctl.engine.trainer import Trainer
from kdctl.errors import KdctlError
from kdctl.evaluation.box_map import evaluate
from kdctl.models.detector import build_detector
from kdctl.recipe import detector_config, load_recipe

from conftest import ROOT, shared
from helpers import run

TINY = [
    "data.shapes.train_images=16", "data.shapes.val_images=8", "data.shapes.image_size=96",
    "data.short_side=96", "data.max_side=96", "data.batch_size=4", "data.num_workers=0",
    "model.student.backbone=test_resnet", "model.student.fpn_channels=32", "model.student.feat_channels=32",
    "model.student.stacked_convs=2", "train.epochs=2", "train.warmup_iters=4", "train.log_every=1",
    "runtime.threads=1",
]


def tiny(*extra: str):
    return load_recipe("shapes", [*TINY, *extra])


def weights(path):
    return load_file(str(path))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("head", ["gfl", "retinanet"])
def test_thirty_steps_reduce_the_loss(tmp_path, head):
    """Loss on the same fixed batches before and after 30 steps (per-batch losses are too noisy
    to compare first and last steps)."""
    recipe = tiny("data.shapes.train_images=120", "train.epochs=1", f"model.student.head={head}")
    trainer = Trainer(recipe, tmp_path / "run", quiet=True)
    fixed = collate([trainer.train_set[i] for i in range(8)])

    def fixed_loss():
        with torch.no_grad():
            return float(sum(trainer.model.loss(trainer.model(fixed.images), fixed).values()))

    before = fixed_loss()
    summary = trainer.fit()
    assert summary["step"] == 30 and len(train_losses(tmp_path / "run")) == 30
    after = fixed_loss()
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("head", ["gfl", "retinanet"])
def test_one_image_overfits_to_high_ap(head):
    torch.manual_seed(0)
    cfg = detector_config(head=head, backbone="test_resnet", fpn_channels=32, feat_channels=32, stacked_convs=2,
                         norm_eval=False, frozen_stages=-1)
    model = build_detector(cfg, 3)
    ds = ShapesDataset(num_images=1, image_size=160, num_classes=3, seed=3, min_objects=3, max_objects=3,
                       transforms=build_transforms(False, short_side=160, max_side=160, mean=model.mean, std=model.std))
    batch = collate([ds[0]])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(150):
        loss = sum(model.loss(model(batch.images), batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    dets = model.predict(batch.images, batch.valid_sizes, batch.scales)
    ds.transforms = None
    ap = evaluate(ds.to_coco(), dets.to_coco(batch.image_ids, ds.cat_ids))["metrics"]["AP50"]
    assert ap > 0.9, ap


def test_resume_gives_identical_weights(tmp_path):
    recipe = tiny()  # 2 epochs x 4 steps
    Trainer(recipe, tmp_path / "full", quiet=True).fit()
    Trainer(recipe, tmp_path / "split", quiet=True, max_steps=6).fit()  # stops inside epoch 2
    partial = weights(tmp_path / "split" / "last.safetensors")
    assert not all(torch.equal(partial[k], v) for k, v in weights(tmp_path / "full" / "last.safetensors").items())
    summary = Trainer(recipe, tmp_path / "split", quiet=True, resume=True).fit()
    assert summary["step"] == 8
    assert_same_weights(tmp_path / "full" / "last.safetensors", tmp_path / "split" / "last.safetensors")
    # metrics.jsonl has each step once
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full")


def test_deterministic_mode_repeats_exactly(tmp_path):
    recipe = tiny("train.deterministic=true", "train.epochs=1")
    Trainer(recipe, tmp_path / "a", quiet=True).fit()
    Trainer(recipe, tmp_path / "b", quiet=True).fit()
    assert_same_weights(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")


def test_resume_refuses_a_different_recipe_and_an_existing_run_needs_resume(tmp_path):
    Trainer(tiny("train.epochs=1"), tmp_path / "run", quiet=True, max_steps=2).fit()
    with pytest.raises(KdctlError, match="already holds a run"):
        Trainer(tiny("train.epochs=1"), tmp_path / "run", quiet=True)
    with pytest.raises(KdctlError, match="train.lr"):
        Trainer(tiny("train.epochs=1", "train.lr=0.5"), tmp_path / "run", quiet=True, resume=True)
    with pytest.raises(KdctlError, match="nothing to resume"):
        Trainer(tiny(), tmp_path / "empty", quiet=True, resume=True)


class _Diverging(Trainer):
    """Losses turn NaN from step 3 on."""

    def compute_losses(self, batch):
        losses = super().compute_losses(batch)
        if self.state.step >= 3:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses


def test_non_finite_losses_skip_then_abort_keeping_last_good_checkpoint(tmp_path):
    recipe = tiny("data.shapes.train_images=40", "train.epochs=1", "train.checkpoint_every=2")
    trainer = _Diverging(recipe, tmp_path / "run", quiet=True)
    with pytest.raises(KdctlError, match="non-finite loss for 5 steps in a row at step 8; the last good checkpoint"):
        trainer.fit()
    saved, meta = load_checkpoint_weights(tmp_path / "run" / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert meta["step"] == "2"  # steps 4-8 were skipped; no checkpoint is written during the streak


def test_cli_train_then_eval_checkpoint(tmp_path):
    sets = [x for s in TINY for x in ("--set", s)]
    res = run("train", "shapes", *sets, "--set", "train.epochs=1", "--out", tmp_path / "run", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["step"] == 4 and (tmp_path / "run" / "best.safetensors").is_file()
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    res = run("eval", tmp_path / "run" / "best.safetensors", "--json", "-", "--save-predictions", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output[res.output.index("{"):])["metrics"]
    assert set(metrics) >= {"AP", "AP50", "AR100"}
    preds = json.loads((tmp_path / "p.json").read_text())
    assert all(set(p) == {"image_id", "category_id", "bbox", "score"} for p in preds)
    rows = json.loads(run("compare", tmp_path / "run", "--json").output)
    assert rows[0]["steps"] == 4 and rows[0]["head"] == "gfl" and rows[0]["evals"] == 1
    assert rows[0]["best"]["AP"] == pytest.approx(metrics["AP"])  # the run's own eval = kdctl eval
    assert 0 < rows[0]["params_m"] < 5
    assert run("compare", tmp_path).exit_code == 2  # not a run directory
    again = run("train", "shapes", *sets, "--out", tmp_path / "run")
    assert again.exit_code == 2 and "--resume" in again.output


def test_cli_eval_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    res = run("eval", bad)
    assert res.exit_code == 2 and "bad.safetensors" in res.output and "Traceback" not in res.output
    res = run("eval", tmp_path / "missing")
    assert res.exit_code == 2 and "no such checkpoint" in res.output


@pytest.mark.parametrize("name,data,extra", [
    ("coco8", "coco8", ["data.short_side=128", "data.max_side=128", "data.batch_size=2"]),
    ("raccoon", "raccoon-voc", ["data.short_side=96", "data.max_side=128", "data.batch_size=8"]),
])
def test_train_and_eval_on_shared_datasets(tmp_path, monkeypatch, name, data, extra):
    shared(data)
    monkeypatch.chdir(ROOT)  # the built-in recipes name ../shared/data relative to the repository

    model = ["model.student.backbone=test_resnet", "model.student.fpn_channels=32", "model.student.feat_channels=32",
             "model.student.stacked_convs=2", "train.epochs=1", "data.num_workers=0", "runtime.threads=1"]
    sets = [x for s in [*model, *extra] for x in ("--set", s)]
    res = run("train", name, *sets, "--max-steps", "2", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    res = run("eval", tmp_path / "run", "--json", "-")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["num_images"] > 0 and 0.0 <= out["metrics"]["AP"] <= 1.0


def test_bf16_autocast_and_channels_last_train_on_cpu(tmp_path):
    recipe = tiny("train.amp=bf16", "train.channels_last=true", "train.epochs=1")
    summary = Trainer(recipe, tmp_path / "run", quiet=True).fit()
    assert summary["step"] == 4
    losses = train_losses(tmp_path / "run")
    assert all(0 < v < 100 for v in losses)
    saved = weights(tmp_path / "run" / "last.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(KdctlError, match="fp16"):
        Trainer(tiny("train.amp=fp16"), "unused", quiet=True)
