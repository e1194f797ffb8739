"""``kdctl train``: the training loop, its run directory, checkpoints and exact resume.

A run directory holds::

    recipe.yaml            the resolved recipe (what ``--resume`` continues)
    metrics.jsonl          one JSON object per log interval / evaluation
    tb/                    TensorBoard scalars (when tensorboard is installed)
    last.safetensors       weights at the latest save (+ the recipe in its metadata)
    last.state.pt          optimizer / scheduler / scaler / RNG / step (weights_only=True)
    best.safetensors       weights with the best bbox AP so far (+ best.state.pt)

The loop (:meth:`Trainer.train_one_epoch`) reads top to bottom; what a subclass (distillation,
:class:`kdctl.distill.trainer.DistillTrainer`) changes are the hooks :meth:`Trainer.build_model`,
:meth:`Trainer.compute_losses`, :meth:`Trainer.optimized` and :meth:`Trainer.extra_state`.

Host syncs: the loss terms are accumulated on the device and read every ``log_every`` steps.
The one per-step sync is the finiteness check of the loss and gradient norm just before the
optimizer step (the same one ``torch.amp.GradScaler`` makes), after backward has been queued.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from rich.console import Console

from kdctl import __version__
from kdctl.data import build_dataset
from kdctl.data.transforms import build_transforms
from kdctl.engine import checkpoint as ckpt
from kdctl.engine.inference import evaluate_model, val_transforms
from kdctl.engine.loader import EpochBatchSampler, make_loader, num_batches
from kdctl.engine.metrics import MetricsLog
from kdctl.engine.optim import build_optimizer
from kdctl.engine.progress import TrainProgress
from kdctl.engine.runtime import autocast, check_amp, peak_memory_mb, pick_device, setup_runtime
from kdctl.engine.schedule import make_scheduler
from kdctl.errors import KdctlError
from kdctl.models.detector import build_detector
from kdctl.recipe import Recipe, validate_raw

console = Console(stderr=True)

MAX_NONFINITE = 5  # consecutive non-finite steps before a run aborts


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""

    step: int = 0  # optimizer steps taken (global)
    best_ap: float = -1.0
    nonfinite: int = 0  # consecutive non-finite steps
    save_id: str = ""
    history: list = field(default_factory=list)  # [(epoch, AP)] of every evaluation
    train_time: float = 0.0  # seconds spent in training steps (evaluation excluded), over resumes


class Trainer:
    """Train ``recipe.model.student`` on ``recipe.data``; see the module docstring.

    Args:
        recipe: the resolved recipe.
        run_dir: where the run lives; created if missing.
        resume: continue from ``run_dir/last``; the run directory's ``recipe.yaml`` must equal
            ``recipe`` (only ``train.epochs`` may grow).
        max_steps: stop after this many global steps (the schedule still spans all epochs);
            used to split a run in two and by tests.
        quiet: no live progress (tests).
        which: train the recipe's ``model.student`` (default) or ``model.teacher`` (to make a
            teacher for a later distillation from the same recipe).
    """

    def __init__(self, recipe: Recipe, run_dir: Path, *, resume: bool = False, max_steps: int | None = None,
                 quiet: bool = False, which: str = "student"):
        if which not in ("student", "teacher"):
            raise KdctlError(f"--model must be 'student' or 'teacher', got {which!r}")
        if which == "teacher" and recipe.model.teacher is None:
            raise KdctlError("the recipe has no model.teacher section; add one or train the student")
        self.which = which
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.max_steps = max_steps
        self.quiet = quiet
        t = recipe.train
        self.device = pick_device(recipe.runtime.device)
        check_amp(t.amp, self.device)
        self._prepare_run_dir(resume)
        setup_runtime(threads=recipe.runtime.threads, seed=t.seed, deterministic=t.deterministic)

        d = recipe.data
        self.train_set = build_dataset(d, "train")
        num_classes = len(self.train_set.classes)
        self.model = self.build_model(num_classes).to(self.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        mean, std = self.model.mean, self.model.std
        self.train_set.transforms = build_transforms(True, short_side=d.short_side, max_side=d.max_side, hflip=d.hflip,
                                                     mean=mean, std=std)
        self.val_set = build_dataset(d, "val", transforms=val_transforms(d, mean, std))
        if self.val_set.classes != self.train_set.classes:
            raise KdctlError(f"{d.path}: train and val splits have different classes; give both the same class list")
        self.val_gt = self.val_set.to_coco()

        self.steps_per_epoch = num_batches(len(self.train_set), d.batch_size)
        self.total_steps = t.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.optimized(), t)
        self.scheduler = make_scheduler(
            self.optimizer, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps, schedule=t.schedule,
            milestones=t.milestones, gamma=t.gamma, warmup_iters=t.warmup_iters, warmup_ratio=t.warmup_ratio,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.state = TrainState()
        self.metrics = MetricsLog(self.run_dir)
        if resume:
            self._resume()

    # ------------------------------------------------------------------ hooks
    def build_model(self, num_classes: int) -> torch.nn.Module:
        return build_detector(getattr(self.recipe.model, self.which), num_classes)

    def trainable(self) -> torch.nn.Module:
        """The module that checkpoints store (and ``kdctl eval`` / export read)."""
        return self.model

    def optimized(self) -> torch.nn.Module:
        """The module whose parameters the optimizer updates: ``trainable()`` plus whatever else
        learns during training only (the distiller's adapters)."""
        return self.trainable()

    def extra_state(self) -> dict:
        """Tensors besides the checkpointed model that resuming needs (adapters)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        """Named weighted losses of one batch (already on the device)."""
        outputs = self.model(batch.images)
        return self.model.loss(outputs, batch)

    def evaluate(self) -> dict:
        t = self.recipe.train
        return evaluate_model(self.model, self.val_set, self.recipe.eval, device=self.device, amp=t.amp,
                              num_workers=self.recipe.data.num_workers, pad_divisor=self.recipe.data.pad_divisor,
                              gt=self.val_gt)

    # ------------------------------------------------------------------ run directory
    def _prepare_run_dir(self, resume: bool) -> None:
        recipe_file = self.run_dir / "recipe.yaml"
        if resume:
            if not (self.run_dir / "last.safetensors").is_file():
                raise KdctlError(f"{self.run_dir}: nothing to resume (no last.safetensors); start without --resume")
            saved = validate_raw(yaml.safe_load(recipe_file.read_text()), str(recipe_file))
            want = self.recipe.model_copy(update={"train": self.recipe.train.model_copy(update={"epochs": saved.train.epochs})})
            if want != saved:
                diff = _first_difference(saved.model_dump(mode="json"), want.model_dump(mode="json"))
                raise KdctlError(f"{recipe_file}: the run was started with a different recipe ({diff}); "
                                 "resume with the same recipe and overrides, or train into a new --out")
            if self.recipe.train.epochs < saved.train.epochs:
                raise KdctlError(f"{recipe_file}: train.epochs can only grow on resume (run has {saved.train.epochs})")
        elif (self.run_dir / "last.safetensors").exists():
            raise KdctlError(f"{self.run_dir} already holds a run; add --resume to continue it, or give another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_bytes(recipe_file, self.recipe.to_yaml().encode())

    def _meta(self) -> dict[str, str]:
        return {"recipe": self.recipe.to_yaml(), "kdctl_version": __version__, "step": str(self.state.step),
                "num_classes": str(len(self.train_set.classes)), "classes": "\n".join(self.train_set.classes),
                "model": self.which, "format": "kdctl.detector/1"}

    def save(self, name: str) -> None:
        """Write ``name.safetensors`` + ``name.state.pt`` atomically, with one shared save id.
        Nothing is written during a non-finite streak, so ``last`` stays the last good state."""
        if self.state.nonfinite:
            return
        train_state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(), "step": self.state.step,
            "best_ap": self.state.best_ap, "nonfinite": self.state.nonfinite, "history": self.state.history,
            "train_time": self.state.train_time, "extra": self.extra_state(),
        }
        self.state.save_id = ckpt.save_checkpoint(self.run_dir, name, self.trainable(), train_state, self._meta())

    def _resume(self) -> None:
        state, meta = ckpt.load_checkpoint_weights(self.run_dir / "last.safetensors")
        ckpt.load_model_weights(self.trainable(), state, str(self.run_dir / "last.safetensors"))
        ts = ckpt.load_train_state(self.run_dir, "last", meta.get("save_id"))
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.scaler.load_state_dict(ts["scaler"])
        ckpt.set_rng_state(ts["rng"])
        self.load_extra_state(ts.get("extra", {}))
        self.state = TrainState(step=int(ts["step"]), best_ap=float(ts["best_ap"]), nonfinite=int(ts["nonfinite"]),
                                history=list(ts["history"]), train_time=float(ts.get("train_time", 0.0)))
        self.metrics.truncate_after(self.state.step)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train to the end (or ``max_steps``); returns a summary dict."""
        t = self.recipe.train
        start_epoch = self.state.step // self.steps_per_epoch
        progress = TrainProgress(t.epochs, self.steps_per_epoch, disable=self.quiet, console=console)
        last_eval: dict | None = None
        with progress:
            for epoch in range(start_epoch, t.epochs):
                finished = self.train_one_epoch(epoch, progress)
                if not finished:
                    break
                end = epoch + 1
                if end % t.eval_every == 0 or end == t.epochs:
                    last_eval = self._evaluate_and_save(epoch, progress)
                else:
                    self.save("last")
        self.metrics.close()
        return {"run_dir": str(self.run_dir), "step": self.state.step, "best_ap": self.state.best_ap,
                "last_eval": None if last_eval is None else last_eval["metrics"], "history": self.state.history}

    def train_one_epoch(self, epoch: int, progress: TrainProgress) -> bool:
        """One epoch from wherever ``state.step`` is in it. False when ``max_steps`` stopped it."""
        t, d = self.recipe.train, self.recipe.data
        start = self.state.step - epoch * self.steps_per_epoch
        sampler = EpochBatchSampler(len(self.train_set), d.batch_size, shuffle=True, seed=t.seed, epoch=epoch, start_batch=start)
        loader = make_loader(self.train_set, sampler, num_workers=d.num_workers, pad_divisor=d.pad_divisor,
                             pin_memory=self.device.type == "cuda")
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        n_logged, images_seen, t0 = 0, 0, time.perf_counter()
        progress.start_epoch(epoch, start)
        for batch in loader:
            if self.max_steps is not None and self.state.step >= self.max_steps:
                self.save("last")
                return False
            batch = batch.to(self.device, non_blocking=True)
            if t.channels_last:
                batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            with autocast(t.amp, self.device):
                losses = self.compute_losses(batch)
            total = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            ok = self._optimizer_step(total)
            self.scheduler.step()
            self.state.step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            n_logged += 1
            images_seen += len(batch)
            if ok:
                self.state.nonfinite = 0
            else:
                self._on_nonfinite(losses)
            if self.state.step % t.log_every == 0 or self.state.step % self.steps_per_epoch == 0:
                elapsed = time.perf_counter() - t0
                self.state.train_time += elapsed
                self._log(epoch, sums, n_logged, images_seen / max(elapsed, 1e-9), progress)
                sums, n_logged, images_seen, t0 = {}, 0, 0, time.perf_counter()
            else:
                progress.advance()
            if t.checkpoint_every and self.state.step % t.checkpoint_every == 0:
                self.save("last")
        return True

    def _optimizer_step(self, total: torch.Tensor) -> bool:
        """Unscale, clip, check finiteness (the step's one host sync), step. False if skipped."""
        t = self.recipe.train
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if t.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            finite = torch.isfinite(total.detach()) & torch.isfinite(norm)
        else:
            finite = torch.isfinite(total.detach())
        if t.amp == "fp16":
            # the scaler skips steps with inf/nan gradients itself and lowers its scale; a
            # non-finite *loss* is still counted below
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return bool(finite)
        if bool(finite):
            self.optimizer.step()
            return True
        self.optimizer.zero_grad(set_to_none=True)
        return False

    def _on_nonfinite(self, losses: dict[str, torch.Tensor]) -> None:
        self.state.nonfinite += 1
        bad = ", ".join(k for k, v in losses.items() if not torch.isfinite(v).all()) or "gradients"
        console.print(f"[yellow]warning:[/] step {self.state.step}: non-finite {bad}; step skipped "
                      f"({self.state.nonfinite}/{MAX_NONFINITE} in a row)")
        if self.state.nonfinite >= MAX_NONFINITE:
            last = self.run_dir / "last.safetensors"
            kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
            raise KdctlError(f"training diverged: non-finite loss for {MAX_NONFINITE} steps in a row at step "
                             f"{self.state.step}; {kept}; lower train.lr, raise train.warmup_iters or set train.grad_clip")

    def _log(self, epoch: int, sums: dict, n: int, img_s: float, progress: TrainProgress) -> None:
        names = list(sums)
        values = torch.stack([sums[k] for k in names]).div_(max(n, 1)).tolist() if names else []
        losses = dict(zip(names, values))
        lr = self.optimizer.param_groups[0]["lr"]
        mem = peak_memory_mb(self.device)
        record = {"loss": sum(values), **losses, "lr": lr, "img_s": img_s, "mem_mb": mem,
                  "train_s": self.state.train_time}
        self.metrics.log("train", self.state.step, epoch, record)
        progress.update(self.state.step, epoch, losses, lr, img_s, mem)

    def _evaluate_and_save(self, epoch: int, progress: TrainProgress) -> dict:
        progress.pause()
        result = self.evaluate()
        progress.resume()
        m = result["metrics"]
        ap = m["AP"]
        self.state.history.append([epoch + 1, ap])
        self.metrics.log("eval", self.state.step, epoch, m)
        improved = ap > self.state.best_ap
        if improved:
            self.state.best_ap = ap
        self.save("last")
        if improved:
            self.save("best")
        if not self.quiet:
            console.print(f"epoch {epoch + 1}: AP {ap:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}"
                          + ("  [green](best)[/]" if improved else ""))
        return result


def _first_difference(a, b, prefix: str = "") -> str:
    """The first dotted key where two nested dicts differ, as ``key: a != b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} != {b!r}"


def default_run_dir(recipe_name: str, recipe: Recipe, which: str = "student") -> Path:
    """``{train.out_dir}/{recipe file stem}`` (``-teacher`` appended for the teacher)."""
    stem = Path(recipe_name).stem + ("-teacher" if which == "teacher" else "")
    return Path(recipe.train.out_dir) / stem
