"""``kdctl train``: the training loop, its run directory, checkpoints and exact resume.

A run directory holds::

    recipe.yaml            the resolved recipe (what ``--resume`` continues)
    metrics.jsonl          one JSON object per log interval / evaluation
    tb/                    TensorBoard scalars (when tensorboard is installed)
    last.safetensors       weights at the latest save (+ the recipe in its metadata)
    last.state.pt          optimizer / scheduler / scaler / RNG / step (weights_only=True)
    best.safetensors       weights with the best bbox AP so far (+ best.state.pt)

With ``train.ema`` (:mod:`kdctl.engine.ema`) evaluation uses the averaged weights, the
``.safetensors`` hold them, and the ``.state.pt`` adds the raw training weights for resuming.

The loop (:meth:`Trainer.train_one_epoch`) reads top to bottom. What a subclass (distillation,
:class:`kdctl.distill.trainer.DistillTrainer`) changes is one hook, :meth:`Trainer.build_parts`,
which returns everything the trainer needs as a :class:`TrainParts`: the checkpointed model, the
step module (losses of a batch), the training-only learnable parts (adapters) and what
``runtime.compile`` compiles. Nothing is set as a side effect.

Host syncs: the loss terms are accumulated on the device and read every ``log_every`` steps.
The one per-step sync is the finiteness check of the loss and gradient norm just before the
optimizer step (the same one ``torch.amp.GradScaler`` makes), after backward has been queued.
(A sync-free skip through the fused optimizers' ``found_inf`` was tried and left out: fused
SGD on the CPU fills the momentum buffer with uninitialised memory when its first step is
skipped, PyTorch 2.14.)

Distributed (one process per device, started by torchrun; see :mod:`kdctl.engine.launch`):
the module computing the step's losses (``TrainParts.step``: the detector, or the distiller
with the student and its adapters) is wrapped in DDP; a distillation teacher is
outside it, replicated on every rank. Each rank reads every ``world_size``-th batch of the same
seeded epoch order; loss normalisers are averaged over ranks (:func:`reduce_mean`); logged
losses are averaged; only rank 0 logs and writes files; evaluation is sharded and gathered.
The learning rate is ``train.lr`` unless ``train.scale_lr: linear`` scales it by the total
batch over ``train.base_batch_size`` (16), MMDetection's ``auto_scale_lr`` rule.

Preemption: SIGTERM or SIGINT lets the current step finish, writes ``last`` (atomically) and
returns with ``summary["stopped"]`` set; the CLI then prints the resume command and exits with
128 + the signal's number (143, 130), so that the stopped run never passes for a finished one.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from kdctl.data import build_dataset
from kdctl.data.augment import build_augmented
from kdctl.data.transforms import build_transforms
from kdctl.artifact import checkpoint as ckpt
from kdctl.engine import distributed as dist
from kdctl.artifact import rundir
from kdctl.artifact.stored import detector_meta
from kdctl.engine.ema import build_ema
from kdctl.evaluation.inference import predict_dataset, scored, val_transforms
from kdctl.engine.loader import EpochBatchSampler, make_loader, num_batches, shutdown_workers
from kdctl.engine.metrics import MetricsLog
from kdctl.engine.optim import build_optimizer
from kdctl.engine.parts import DetectorStep, TrainParts
from kdctl.engine.plan import run_plan
from kdctl.engine.progress import TrainProgress
from kdctl.engine.device import autocast, check_amp, compile_module, peak_memory_mb, setup_runtime
from kdctl.engine.schedule import effective_lr, make_scheduler
from kdctl.engine.signals import deferred_stop
from kdctl.engine.transfer import build_with_weights
from kdctl.errors import KdctlError
from kdctl.recipe import Recipe

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
        dry_run: build everything and the plan (:attr:`plan`), then stop before the run
            directory is created; :meth:`fit` must not be called.
        overwrite: a fresh run into a folder that holds a run first deletes that run's files
            (:func:`kdctl.artifact.rundir.clear_run_dir`); without it such a folder is refused.

    The constructor reads top to bottom: model and data (:meth:`_build_model_and_data`), the plan,
    and only then the run directory, so that a recipe, dataset, checkpoint or class-map problem
    leaves nothing behind; then optimization (resumed from ``last`` with ``resume``), the runner
    (compile, DDP) and the loader.
    """

    def __init__(self, recipe: Recipe, run_dir: Path, *, resume: bool = False, max_steps: int | None = None,
                 quiet: bool = False, which: str = "student", dry_run: bool = False, overwrite: bool = False):
        if which not in ("student", "teacher"):
            raise KdctlError(f"--model must be 'student' or 'teacher', got {which!r}")
        if which == "teacher" and recipe.model.teacher is None:
            raise KdctlError("the recipe has no model.teacher section; add one or train the student")
        if resume and overwrite:
            raise KdctlError("--resume continues the run and --overwrite deletes it: give one of them")
        self.which, self.recipe, self.run_dir = which, recipe, Path(run_dir)
        self.overwrite, self.max_steps, self.quiet, self.dry_run = overwrite, max_steps, quiet, dry_run
        self.dist, self.device = dist.init_distributed(recipe.runtime.device)
        self.main = self.dist.main
        check_amp(recipe.train.amp, self.device)
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and (self.run_dir / "last.safetensors").is_file():
            resume = True  # torchrun restarted the group after a failure: continue from the last checkpoint
        self.resuming = resume
        setup_runtime(threads=recipe.runtime.threads, seed=recipe.train.seed, deterministic=recipe.train.deterministic)
        # the parts, each from the recipe; nothing is written before the run directory step
        self._build_model_and_data()
        self.plan = run_plan(self)
        if dry_run:
            return
        self._prepare_run_dir(resume)
        self._build_optimization()
        if resume:
            self._resume()
        elif self.metrics is not None:
            self.metrics.record("plan", 0, self.plan)
        self._build_runner()
        self._build_loader()
        self._stop: str | None = None
        self.unreadable: set[tuple[str, str]] = set()  # images skipped as undecodable (data.skip_bad)

    # ------------------------------------------------------------------ building
    def _build_model_and_data(self) -> None:
        """The train set, the model parts (:meth:`build_parts`, on the device), the transforms
        that take the model's normalisation, the validation set and the step counts."""
        d, t = self.recipe.data, self.recipe.train
        self.train_set = build_dataset(d, "train")
        self.parts = self.build_parts(self.train_set.classes)
        self.parts.step.to(self.device)  # the model, the extra parts (and a distiller's teacher)
        self.model = self.parts.model
        if t.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise KdctlError("train.sync_bn needs CUDA devices (SyncBatchNorm runs on NCCL); set it to false on the CPU")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        mean, std = self.model.mean, self.model.std
        self.train_set.transforms = build_transforms(True, short_side=d.short_side, max_side=d.max_side, hflip=d.hflip,
                                                     mean=mean, std=std)
        self.augmented = build_augmented(self.train_set, d, t.epochs, mean, std)  # None: data.augment off
        self.val_set = build_dataset(d, "val", transforms=val_transforms(d, mean, std))
        if self.val_set.classes != self.train_set.classes:
            raise KdctlError(f"{d.path}: train and val splits have different classes; give both the same class list")
        self.val_gt = self.val_set.to_coco()
        world = self.dist.world_size
        self.steps_per_epoch = num_batches(len(self.train_set), d.batch_size, world)
        self.total_steps = t.epochs * self.steps_per_epoch
        self.lr = effective_lr(t.lr, d.batch_size, world, t.scale_lr, t.base_batch_size)

    def _build_optimization(self) -> None:
        """Optimizer (model and extra parts), lr schedule, GradScaler, counters, metrics log, EMA."""
        t = self.recipe.train
        optimized = self.model if self.parts.extra is None else torch.nn.ModuleList([self.model, self.parts.extra])
        self.optimizer = build_optimizer(optimized, t.model_copy(update={"lr": self.lr}))
        self.scheduler = make_scheduler(
            self.optimizer, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps, schedule=t.schedule,
            milestones=t.milestones, gamma=t.gamma, warmup_iters=t.warmup_iters, warmup_ratio=t.warmup_ratio,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.state = TrainState()
        self.metrics = MetricsLog(self.run_dir) if self.main else None
        self.ema = build_ema(self.model, t.ema)  # None when train.ema is off

    def _build_runner(self) -> None:
        """``runtime.compile`` of the parts' compiled modules, and the step module, DDP-wrapped
        when distributed (:attr:`runner`)."""
        if self.recipe.runtime.compile:
            for module in self.parts.compiled:
                compile_module(module)
        self.step_module = self.parts.step
        self.runner = self.step_module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # buffers are not broadcast each step: BatchNorm statistics are frozen (norm_eval) or
            # synchronised (sync_bn); rank 0's are the ones saved
            self.runner = DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False, gradient_as_bucket_view=True)

    def _build_loader(self) -> None:
        """The seeded epoch sampler (this rank's share) and the training loader."""
        d, t = self.recipe.data, self.recipe.train
        self.sampler = EpochBatchSampler(len(self.train_set), d.batch_size, shuffle=True, seed=t.seed, epoch=0,
                                         rank=self.dist.rank, world_size=self.dist.world_size)
        train_data = self.train_set if self.augmented is None else self.augmented
        self.loader = make_loader(train_data, self.sampler, num_workers=d.num_workers, pad_divisor=d.pad_divisor,
                                  pin_memory=self.device.type == "cuda", persistent=True)

    # ------------------------------------------------------------------ hooks
    def build_parts(self, classes: list[str]) -> TrainParts:
        """The detector of ``recipe.model.<which>`` for the dataset's ``classes`` (with
        ``weights`` or ``init_from`` when set), its loss step, and its backbone and neck for
        ``runtime.compile`` (the head runs eagerly: CrossKD enters it midway)."""
        model, init = build_with_weights(getattr(self.recipe.model, self.which), classes, transfer=not self.resuming)
        return TrainParts(model=model, step=DetectorStep(model), compiled=model.compiled_parts(),
                          info={"init": init} if init else {})

    def extra_state(self) -> dict:
        """Tensors besides the checkpointed model that resuming needs (the extra parts)."""
        if self.parts.extra is None:
            return {}
        return {"kd": {k: v.detach().cpu() for k, v in self.parts.extra.state_dict().items()}}

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        """Named weighted losses of one batch (already on the device)."""
        return self.runner(batch, dist.reduce_mean)

    def evaluate(self) -> dict:
        """COCO metrics on the validation split: each rank predicts every ``world_size``-th
        image, rank 0 scores the gathered predictions, every rank gets the result."""
        t, d, info = self.recipe.train, self.recipe.data, self.dist
        shard = range(info.rank, len(self.val_set), info.world_size) if info.enabled else None
        model = self.model if self.ema is None else self.ema.module
        unreadable: list = []
        preds = predict_dataset(model, self.val_set, self.recipe.eval, device=self.device, amp=t.amp,
                                num_workers=d.num_workers, pad_divisor=d.pad_divisor, indices=shard,
                                description="eval" if self.main else None, unreadable=unreadable)
        preds, unreadable = dist.gather_lists(preds), dist.gather_lists(unreadable)
        self.unreadable.update((f, r) for f, r, _ in unreadable)
        result = scored(self.val_gt, preds, unreadable, per_class=self.recipe.eval.per_class) if self.main else None
        return dist.broadcast(result)

    # ------------------------------------------------------------------ run directory
    def _prepare_run_dir(self, resume: bool) -> None:
        """Check the run directory and mark it as this run's (rank 0 decides, every rank gets
        its verdict, so that no rank fails alone). A fresh run never reuses a folder that holds
        a run unless ``overwrite`` deletes that run's files first
        (:func:`kdctl.artifact.rundir.claim_run_dir`)."""
        recipe_file = self.run_dir / "recipe.yaml"
        problem = None
        if self.main:
            try:
                if resume:
                    rundir.check_resumable(self.run_dir, self.recipe)
                elif removed := rundir.claim_run_dir(self.run_dir, overwrite=self.overwrite, command=self.which):
                    console.print(f"deleted the previous run's {', '.join(removed)} in {self.run_dir} before starting afresh",
                                  markup=False, highlight=False, soft_wrap=True)
                ckpt.atomic_write_bytes(recipe_file, self.recipe.to_yaml().encode())
            except KdctlError as exc:
                problem = str(exc)
        problem = dist.broadcast(problem)
        if problem is not None:
            raise KdctlError(problem)

    def _meta(self) -> dict[str, str]:
        return detector_meta(self.recipe, self.which, self.train_set.classes, step=str(self.state.step))

    def save(self, name: str) -> None:
        """Write ``name.safetensors`` + ``name.state.pt`` atomically, with one shared save id.
        Nothing is written during a non-finite streak, so ``last`` stays the last good state.
        Rank 0 writes; every rank waits for it."""
        if self.state.nonfinite:
            return
        if not self.main:
            dist.barrier()
            return
        train_state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(), "step": self.state.step,
            "best_ap": self.state.best_ap, "nonfinite": self.state.nonfinite, "history": self.state.history,
            "train_time": self.state.train_time, "extra": self.extra_state(),
        }
        model = self.model
        if self.ema is not None:  # the checkpoint's weights are the average; the raw ones resume
            train_state["ema"], model = self.ema.train_state(self.model), self.ema.module
        self.state.save_id = ckpt.save_checkpoint(self.run_dir, name, model, train_state, self._meta())
        dist.barrier()

    def _resume(self) -> None:
        state, meta = ckpt.load_checkpoint_weights(self.run_dir / "last.safetensors")
        ckpt.load_model_weights(self.model if self.ema is None else self.ema.module, state,
                                str(self.run_dir / "last.safetensors"))
        ts = ckpt.load_train_state(self.run_dir, "last", meta.get("save_id"))
        ckpt.check_train_state(ts, self.run_dir / "last.state.pt")
        with ckpt.restoring(self.run_dir / "last.state.pt"):
            self._restore(ts)
        if self.metrics is not None:
            _, malformed = self.metrics.truncate_after(self.state.step)
            if malformed and not self.quiet:
                console.print(f"[yellow]warning:[/] {escape(str(self.metrics.path))}: dropped {malformed} malformed "
                              f"line{'s' * (malformed != 1)} (cut short or with fields that are not numbers)")

    def _restore(self, ts: dict) -> None:
        """Load the training state ``ts`` into the optimizer, scheduler, scaler, RNGs, EMA and KD parts."""
        if self.ema is not None:
            self.ema.load_train_state(self.model, ts.get("ema"), str(self.run_dir / "last.state.pt"))
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.scaler.load_state_dict(ts["scaler"])
        ckpt.set_rng_state(ts["rng"])
        kd = ts.get("extra", {}).get("kd")
        if self.parts.extra is not None and kd is not None:
            self.parts.extra.load_state_dict(kd)
        self.state = TrainState(step=int(ts["step"]), best_ap=float(ts["best_ap"]), nonfinite=int(ts["nonfinite"]),
                                history=list(ts["history"]), train_time=float(ts.get("train_time", 0.0)))

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train to the end (or ``max_steps``, or a SIGTERM/SIGINT); returns a summary dict
        (``stopped``: the signal's name when one ended the run early, else None)."""
        if self.dry_run:
            raise RuntimeError("a dry-run trainer has no run directory: build it without dry_run to train")
        t = self.recipe.train
        start_epoch = self.state.step // self.steps_per_epoch
        progress = TrainProgress(t.epochs, self.steps_per_epoch, disable=self.quiet or not self.main, console=console)
        last_eval: dict | None = None
        if self.main and not self.quiet and self.state.step == 0:
            d = self.recipe.data
            scaled = f" (linear scaling of {t.lr:g} at {t.base_batch_size})" if t.scale_lr == "linear" else ""
            console.print(f"total batch {d.batch_size * self.dist.world_size} ({self.dist.world_size} x {d.batch_size}) "
                          f"on {self.device}; lr {self.lr:g}{scaled}")
        try:
            with progress, deferred_stop(self._on_stop_signal):
                for epoch in range(start_epoch, t.epochs):
                    finished = self.train_one_epoch(epoch, progress)
                    if not finished:
                        break
                    end = epoch + 1
                    if end % t.eval_every == 0 or end == t.epochs:
                        last_eval = self._evaluate_and_save(epoch, progress)
                    else:
                        self.save("last")
        finally:
            shutdown_workers(self.loader)
        if self.metrics is not None:
            self.metrics.close()
        return {"run_dir": str(self.run_dir), "step": self.state.step, "best_ap": self.state.best_ap,
                "last_eval": None if last_eval is None else last_eval["metrics"], "history": self.state.history,
                "stopped": self._stop, "unreadable": [{"file": f, "reason": r} for f, r in sorted(self.unreadable)]}

    def _on_stop_signal(self, name: str) -> None:
        self._stop = self._stop or name

    def train_one_epoch(self, epoch: int, progress: TrainProgress) -> bool:
        """One epoch from wherever ``state.step`` is in it. False when ``max_steps`` or a signal
        stopped it (after saving ``last``)."""
        t = self.recipe.train
        start = self.state.step - epoch * self.steps_per_epoch
        self.sampler.set_epoch(epoch, start)
        if self.augmented is not None and self.augmented.set_epoch(epoch):
            shutdown_workers(self.loader)  # data.augment.close_epochs: persistent workers restart with the switch
        self.step_module.train()
        sums: dict[str, torch.Tensor] = {}
        n_logged, images_seen, t0 = 0, 0, time.perf_counter()
        progress.start_epoch(epoch, start)
        for batch in self.loader:
            if self.max_steps is not None and self.state.step >= self.max_steps:
                self.save("last")
                return False
            if batch.unreadable:
                self.unreadable.update((f, r) for f, r, _ in batch.unreadable)
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
            images_seen += len(batch) * self.dist.world_size
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
            if dist.any_rank(self._stop is not None):
                self._stop = self._stop or "SIGTERM"  # another rank got the signal
                self.state.train_time += time.perf_counter() - t0
                self.save("last")
                return False
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
        if self.dist.enabled:  # every rank must take (or skip) the same step
            finite = dist.all_sum(finite.float().reshape(1)) == self.dist.world_size
        if t.amp == "fp16":
            # the scaler skips steps with inf/nan gradients itself and lowers its scale; a
            # non-finite *loss* is still counted below. The EMA follows the steps taken: the
            # scaler's found_inf, which scaler.step reads on the host right after anyway
            stepped = self.ema is not None and not any(
                v.item() for v in self.scaler._found_inf_per_device(self.optimizer).values())
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if stepped:
                self.ema.update()
            return bool(finite)
        if bool(finite):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            return True
        self.optimizer.zero_grad(set_to_none=True)
        return False

    def _on_nonfinite(self, losses: dict[str, torch.Tensor]) -> None:
        self.state.nonfinite += 1
        bad = ", ".join(k for k, v in losses.items() if not torch.isfinite(v).all()) or "gradients"
        if self.main:
            console.print(f"[yellow]warning:[/] step {self.state.step}: non-finite {bad}; step skipped "
                          f"({self.state.nonfinite}/{MAX_NONFINITE} in a row)")
        if self.state.nonfinite >= MAX_NONFINITE:
            last = self.run_dir / "last.safetensors"
            kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
            raise KdctlError(f"training diverged: non-finite loss for {MAX_NONFINITE} steps in a row at step "
                             f"{self.state.step}; {kept}; lower train.lr, raise train.warmup_iters or set train.grad_clip")

    def _log(self, epoch: int, sums: dict, n: int, img_s: float, progress: TrainProgress) -> None:
        names = list(sums)
        values = []
        if names:
            stacked = torch.stack([sums[k] for k in names]).div_(max(n, 1))
            values = (dist.all_sum(stacked) / self.dist.world_size).tolist()  # the mean over ranks
        if not self.main:
            return
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
        if self.metrics is not None:
            self.metrics.log("eval", self.state.step, epoch, m)
        improved = ap > self.state.best_ap
        if improved:
            self.state.best_ap = ap
        self.save("last")
        if improved:
            self.save("best")
        if not self.quiet and self.main:
            console.print(f"epoch {epoch + 1}: AP {ap:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}"
                          + ("  [green](best)[/]" if improved else ""))
        return result


def default_run_dir(recipe_name: str, recipe: Recipe, which: str = "student") -> Path:
    """``{train.out_dir}/{recipe file stem}`` (``-teacher`` appended for the teacher)."""
    stem = Path(recipe_name).stem + ("-teacher" if which == "teacher" else "")
    return Path(recipe.train.out_dir) / stem
