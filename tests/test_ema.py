"""Weight EMA (``train.ema``, kdctl.engine.ema): the update rule by hand, off changes nothing,
checkpoints hold the average and eval reads it, resume is exact, skipped steps are not
averaged, and distillation averages the student only."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdctl.cli import app
from kdctl.distill.trainer import DistillTrainer
from kdctl.engine import trainer as trainer_module
from kdctl.artifact.checkpoint import load_train_state
from kdctl.engine.ema import ModelEMA
from kdctl.engine.trainer import Trainer
from kdctl.errors import RecipeError
from kdctl.recipe import load_recipe

TINY = [
    "data.shapes.train_images=16", "data.shapes.val_images=8", "data.shapes.image_size=96",
    "data.short_side=96", "data.max_side=96", "data.batch_size=4", "data.num_workers=0",
    "model.student.backbone=test_resnet", "model.student.fpn_channels=32", "model.student.feat_channels=32",
    "model.student.stacked_convs=2", "model.student.norm_eval=false", "model.student.frozen_stages=-1",
    "train.epochs=2", "train.warmup_iters=4", "train.log_every=1", "runtime.threads=1",
]
# a short ramp, so that a few steps give an average visibly apart from the raw weights
EMA = ["train.ema.decay=0.8", "train.ema.tau=2"]


def tiny(*extra: str):
    return load_recipe("shapes", [*TINY, *extra])


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cpu_state(module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def train_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def raw_weights(run_dir, name="last") -> dict:
    return load_train_state(run_dir, name, None)["ema"]["weights"]


# ============================================================================= the rule
def test_update_rule_matches_a_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1)).double()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(1.0)
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    for value in (3.0, 5.0):  # two applied steps: every weight and BN statistic becomes `value`
        with torch.no_grad():
            for t in model.state_dict().values():
                t.fill_(value) if t.is_floating_point() else t.add_(7)
        ema.update()
    # d1 = 0.9 (1 - e^-0.5) = 0.354122; e1 = d1 * 1 + (1 - d1) * 3 = 2.291755
    # d2 = 0.9 (1 - e^-1) = 0.568909;   e2 = d2 * e1 + (1 - d2) * 5 = 3.459256
    d1, d2 = 0.9 * (1 - math.exp(-0.5)), 0.9 * (1 - math.exp(-1.0))
    assert d1 == pytest.approx(0.354122, abs=1e-6) and d2 == pytest.approx(0.568909, abs=1e-6)
    e2 = d2 * (d1 * 1 + (1 - d1) * 3) + (1 - d2) * 5
    assert e2 == pytest.approx(3.459256, abs=1e-6)
    state = ema.module.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(state[key], torch.full_like(state[key], e2), rtol=0, atol=1e-12), key  # statistics too
    assert state["1.num_batches_tracked"].item() == 14  # integer buffers copied
    assert ema.updates == 2 and not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert ModelEMA(model, decay=0.9, tau=0).decay_at(1) == 0.9  # tau 0: no ramp


def test_recipe_switch_and_one_line_errors():
    assert tiny().train.ema is None  # off by default
    assert tiny("train.ema=true").train.ema.model_dump() == {"decay": 0.9998, "tau": 2000.0}
    assert tiny("train.ema.decay=0.999").train.ema.tau == 2000.0
    assert tiny("train.ema=true", "train.ema=false").train.ema is None
    with pytest.raises(RecipeError, match=r"train\.ema\.decay: expected less than 1") as err:
        tiny("train.ema.decay=1")
    assert "\n" not in str(err.value)


# ============================================================================= the trainer
def test_off_is_bit_identical_and_on_leaves_the_training_weights_alone(tmp_path):
    """EMA off saves what a run without the key saves; EMA on changes neither the raw training
    weights nor the losses (no RNG use, no numerics on the training path)."""
    off = Trainer(tiny("train.epochs=1"), tmp_path / "off", quiet=True)
    assert off.ema is None and off.plan["schedule"]["ema"] is None
    off.fit()
    assert "ema" not in load_train_state(tmp_path / "off", "last", None)
    plain = Trainer(tiny("train.epochs=1", "train.ema=null"), tmp_path / "plain", quiet=True)
    plain.fit()
    off_weights = load_file(str(tmp_path / "off" / "last.safetensors"))
    assert same(off_weights, load_file(str(tmp_path / "plain" / "last.safetensors")))
    on = Trainer(tiny("train.epochs=1", *EMA), tmp_path / "on", quiet=True)
    assert on.plan["schedule"]["ema"] == {"decay": 0.8, "tau": 2.0}
    on.fit()
    assert same(raw_weights(tmp_path / "on"), off_weights)
    assert train_losses(tmp_path / "on") == train_losses(tmp_path / "off")
    assert not same(load_file(str(tmp_path / "on" / "last.safetensors")), off_weights)
    assert on.ema.updates == 4


def test_checkpoints_hold_the_average_and_eval_reads_it(tmp_path, monkeypatch):
    seen = []
    real = trainer_module.predict_dataset

    def spy(model, *args, **kwargs):
        seen.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "predict_dataset", spy)
    trainer = Trainer(tiny("train.epochs=1", *EMA), tmp_path / "run", quiet=True)
    summary = trainer.fit()
    assert seen == [trainer.ema.module]  # the epoch's evaluation ran the average
    for name in ("last", "best"):
        saved = load_file(str(tmp_path / "run" / f"{name}.safetensors"))
        assert same(saved, cpu_state(trainer.ema.module)), name
        assert same(raw_weights(tmp_path / "run", name), cpu_state(trainer.model)), name
        assert not same(saved, cpu_state(trainer.model))
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "run" / "best.safetensors"), "--json", "-"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output[res.output.index("{"):])["metrics"]
    assert metrics["AP"] == pytest.approx(summary["history"][0][1])  # kdctl eval = the run's own eval


def test_resume_gives_identical_average_and_training_weights(tmp_path):
    recipe = tiny(*EMA)  # 2 epochs x 4 steps
    Trainer(recipe, tmp_path / "full", quiet=True).fit()
    Trainer(recipe, tmp_path / "split", quiet=True, max_steps=6).fit()  # stops inside epoch 2
    half = load_file(str(tmp_path / "split" / "last.safetensors"))
    assert not same(half, load_file(str(tmp_path / "full" / "last.safetensors")))
    resumed = Trainer(recipe, tmp_path / "split", quiet=True, resume=True)
    assert resumed.ema.updates == 6
    resumed.fit()
    assert resumed.ema.updates == 8
    for name in ("last", "best"):
        assert same(load_file(str(tmp_path / "full" / f"{name}.safetensors")),
                    load_file(str(tmp_path / "split" / f"{name}.safetensors"))), name
        assert same(raw_weights(tmp_path / "full", name), raw_weights(tmp_path / "split", name)), name


class _SkipTwo(Trainer):
    """The loss is NaN at steps 2 and 3 (0-based), so those two optimizer steps are skipped."""

    def compute_losses(self, batch):
        losses = super().compute_losses(batch)
        if self.state.step in (2, 3):
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses


def test_a_skipped_step_is_not_averaged(tmp_path):
    trainer = _SkipTwo(tiny("data.shapes.train_images=24", "train.epochs=1", *EMA), tmp_path / "run", quiet=True)
    trainer.fit()
    assert trainer.state.step == 6 and trainer.ema.updates == 4  # 2 skipped


def test_a_step_the_fp16_scaler_skips_is_not_averaged(tmp_path, monkeypatch):
    """fp16 runs on CUDA only; on the CPU the GradScaler path is exercised with a CPU scaler
    (check_amp bypassed) and NaN gradients at steps 2 and 3."""
    monkeypatch.setattr(trainer_module, "check_amp", lambda amp, device: None)
    monkeypatch.setattr(trainer_module, "autocast", lambda amp, device: torch.autocast("cpu", enabled=False))
    trainer = _SkipTwo(tiny("data.shapes.train_images=24", "train.epochs=1", "train.amp=fp16", *EMA),
                       tmp_path / "run", quiet=True)
    if trainer.device.type != "cpu":
        pytest.skip("CPU only")
    assert trainer.scaler.is_enabled()
    scales = []  # a skipped step shows as a lowered scale
    update = trainer.scaler.update

    def record(*args):
        update(*args)
        scales.append(trainer.scaler.get_scale())

    trainer.scaler.update = record
    trainer.fit()
    skipped = sum(b < a for a, b in zip([65536.0, *scales], scales))
    assert skipped == 2 and trainer.ema.updates == 6 - skipped


# ============================================================================= distillation
def test_distill_averages_the_student_only(tmp_path):
    side = ["backbone=test_resnet", "fpn_channels=64", "feat_channels=64", "stacked_convs=2"]
    teacher = tmp_path / "teacher"
    Trainer(tiny("train.epochs=1", *(f"model.teacher.{s}" for s in side)), teacher, quiet=True, which="teacher",
            max_steps=2).fit()
    recipe = tiny("train.epochs=1", *EMA, f"model.teacher_checkpoint={teacher / 'last.safetensors'}",
                  "distill.losses=[{type: crosskd, reuse_idx: 1}, {type: feat_l2}]")
    trainer = DistillTrainer(recipe, tmp_path / "run", quiet=True)
    assert trainer.parts.extra is not None  # 32 -> 64 wide: adapters, trained but never averaged
    adapters = cpu_state(trainer.parts.extra)
    trainer.fit()
    assert trainer.ema.updates == 4
    saved = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert set(saved) == set(trainer.model.state_dict())  # the student's tensors only
    assert same(saved, cpu_state(trainer.ema.module))
    state = load_train_state(tmp_path / "run", "last", None)
    assert same(state["ema"]["weights"], cpu_state(trainer.model))
    assert same(state["extra"]["kd"], cpu_state(trainer.parts.extra))
    assert not same(state["extra"]["kd"], adapters)  # the adapters learned, outside the average
