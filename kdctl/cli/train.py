"""kdctl train / distill / compare, and what train and distill share: the torchrun launch options
and the run summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from kdctl.cli.common import cli_errors, err, out, print_json, say, say_unreadable
from kdctl.errors import KdctlError

# launch options shared by train and distill: more than one process goes through torchrun
NPROC = typer.Option(None, "--nproc", min=1, help="Processes on this node (CPU: gloo; CUDA: one per device). Starts the same command through torch.distributed.run.")
DEVICES = typer.Option(None, "--devices", help="CUDA devices to train on, e.g. 0,1,2,3: one process each, through torch.distributed.run.")
NNODES = typer.Option(1, "--nnodes", min=1, help="Nodes in the job (run the same command on each).")
NODE_RANK = typer.Option(None, "--node-rank", min=0, help="This node's rank (static rendezvous at --rdzv-endpoint); omit for elastic c10d rendezvous.")
RDZV = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous (node 0) for several nodes.")
RESTARTS = typer.Option(0, "--max-restarts", min=0, help="torchrun restarts a failed group this many times; it resumes from the last checkpoint.")

RECIPE = typer.Argument(..., help="Built-in recipe name or recipe file.")
RESUME = typer.Option(False, "--resume", help="Continue the run in the run directory from its last checkpoint.")
OVERWRITE = typer.Option(False, "--overwrite", help="Start afresh in a run directory that holds a run: first delete that run's files (checkpoints last/best/step_*, recipe.yaml, metrics.jsonl, tb/, .kdctl-run) and nothing else.")
DEVICE = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (overrides runtime.device).")
SUMMARY_JSON = typer.Option(False, "--json", help="Print the run summary as JSON.")
DRY_RUN = typer.Option(False, "--dry-run", help="Print the plan (models, classes, init_from, KD methods, schedule) and exit without creating the run directory.")


def _detector_line(d: dict) -> str:
    return (f"{d['family']} / {d['backbone']}, {d['params'] / 1e6:.2f} M parameters "
            f"({d['trainable'] / 1e6:.2f} M trainable), {d['num_classes']} classes")


def render_plan(plan: dict) -> None:
    """The plan, one fact per line, on stderr (stdout stays free for --json)."""
    from rich.markup import escape

    s = plan["detector"]
    names = ", ".join(s.get("classes", []))
    more = s["num_classes"] - len(s.get("classes", []))
    lines = [f"{'student' if plan['model'] == 'student' else 'teacher'}: {_detector_line(s)}",
             f"classes: {names}{f' (+{more} more)' if more > 0 else ''}"]
    if s.get("init"):
        i = s["init"]
        rows = i.get("class_rows")
        mapped = f"; class rows copied for {rows['mapped']} of {rows['of']} classes" if rows else ""
        lines.append(f"init_from {i['source']}: {i['loaded']} tensors loaded, {i['reinitialised']} re-initialised, "
                     f"{i['ignored']} ignored{mapped}")
    if plan["command"] == "distill":
        t = plan.get("teacher")
        lines.append(f"teacher: {_detector_line(t)} from {t['checkpoint']}" if t else "teacher: none (the student alone)")
        if plan.get("class_map"):
            m = plan["class_map"]
            pairs = ", ".join(f"{a}->{b}" for a, b in list(m["map"].items())[:8])
            lines.append(f"class map (teacher has {m['teacher_classes']} classes): {pairs}")
        for row in plan.get("methods", []):
            extra = "".join(f", {k} {row[k]:g}" for k in ("cls_weight", "reg_weight") if k in row)
            idx = f", reuse_idx {row['reuse_idx']}" if "reuse_idx" in row else ""
            lines.append(f"KD {row['type']}: weight {row['weight']:g}{extra}{idx}{', adapters' if row['adapters'] else ''}")
    d, sc = plan["data"], plan["schedule"]
    a = d.get("augment")
    augment = (f"; augmentation: mosaic p {a['mosaic']:g}, scale {a['scale'][0]:g}-{a['scale'][1]:g}, HSV"
               + (f", off for the last {a['close_epochs']} epochs" if a["close_epochs"] else "")) if a else ""
    lines.append(f"data: {d['format']}, {d['train_images']} train / {d['val_images']} val images at {d['size'][0]}-{d['size'][1]} px"
                 + augment)
    stop = f", stopping at step {sc['max_steps']}" if sc["max_steps"] else ""
    lines.append(f"schedule: {sc['epochs']} epochs x {sc['steps_per_epoch']} steps = {sc['total_steps']} steps{stop}, "
                 f"batch {sc['batch']}, {sc['optimizer']} lr {sc['lr']:g} ({sc['schedule']}, warm-up {sc['warmup_iters']}), "
                 f"amp {sc['amp']}, {sc['device']}"
                 + (f", weight EMA decay {sc['ema']['decay']:g} (ramp tau {sc['ema']['tau']:g})" if sc.get("ema") else ""))
    lines.append(f"run directory: {plan['run_dir']}")
    for line in lines:
        err.print(escape(line), soft_wrap=True)


def start_run(trainer, dry_run: bool, as_json: bool):
    """Show the plan (rank 0); with ``dry_run``, print it (JSON with --json) and stop."""
    if dry_run:
        if trainer.main and as_json:
            print_json(trainer.plan)
        elif trainer.main:
            render_plan(trainer.plan)
        raise typer.Exit(0)
    if trainer.main:
        render_plan(trainer.plan)


def launches(nproc, devices, nnodes) -> bool:
    """Whether this command hands itself to torchrun (more than one process, not already a worker)."""
    from kdctl.engine.launch import in_worker

    return not in_worker() and ((nproc or 1) > 1 or devices is not None or nnodes > 1)


def maybe_launch(nproc, devices, nnodes, node_rank, rdzv_endpoint, max_restarts, run_dir: Path) -> None:
    """Hand the command to torchrun when it asks for more than one process and this process is
    not already a worker; then exit with torchrun's exit code."""
    from kdctl.engine.launch import launch, program_args

    if not launches(nproc, devices, nnodes):
        return
    code = launch(program_args(), nproc=nproc, devices=devices, nnodes=nnodes, node_rank=node_rank,
                  rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts, run_dir=run_dir)
    raise typer.Exit(code)


def finish_run(summary: dict, run_dir: Path, as_json: bool, rank0: bool) -> None:
    """Render a run's summary (rank 0 only); a signal-stopped run prints how to resume it."""
    from kdctl.engine.distributed import shutdown

    shutdown()
    if not rank0:
        return
    if as_json:
        return print_json(summary)
    say_unreadable(summary.get("unreadable", []))
    if summary.get("stopped"):
        import shlex

        from kdctl.engine.launch import program_args

        args = program_args()
        args = [*args, *([] if "--out" in args or any(a.startswith("--out=") for a in args) else ["--out", str(run_dir)]),
                *([] if "--resume" in args else ["--resume"])]
        say(out, "stopped", "yellow", f"by {summary['stopped']} at step {summary['step']}; checkpoint {run_dir}/last.safetensors")
        out.print(f"resume with: kdctl {shlex.join(args)}", soft_wrap=True, markup=False)
        return
    best = "—" if summary["best_ap"] < 0 else f"{100 * summary['best_ap']:.1f}"
    say(out, "done", "green", f"{summary['step']} steps · best AP {best} · {run_dir}")


def stopped_exit(summary: dict) -> None:
    """A run a signal stopped (after saving ``last``) exits with 128 + the signal's number (143
    SIGTERM, 130 SIGINT), as the shell reports a process the signal ended: chains, make and
    schedulers see that the run did not finish (README, "Safety")."""
    if summary.get("stopped"):
        import signal

        raise typer.Exit(128 + signal.Signals[summary["stopped"]].value)


@cli_errors
def train_cmd(
    recipe: str = RECIPE,
    overrides: list[str] = typer.Option([], "--set", help="Override a field: --set train.epochs=24 (repeatable)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: {train.out_dir}/{recipe name})."),
    resume: bool = RESUME,
    overwrite: bool = OVERWRITE,
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps (the schedule still spans every epoch)."),
    device: Optional[str] = DEVICE,
    model: str = typer.Option("student", "--model", help="Which of the recipe's models to train: student or teacher."),
    as_json: bool = SUMMARY_JSON,
    dry_run: bool = DRY_RUN,
    nproc: Optional[int] = NPROC, devices: Optional[str] = DEVICES, nnodes: int = NNODES,
    node_rank: Optional[int] = NODE_RANK, rdzv_endpoint: Optional[str] = RDZV, max_restarts: int = RESTARTS,
) -> None:
    """Train a detector: checkpoints, metrics.jsonl and COCO evaluation in a run directory.

    Example: [bold]kdctl train shapes --set train.epochs=6 --out runs/shapes-gfl[/]
             [bold]kdctl train shapes --model teacher --out runs/shapes-teacher[/]
             [bold]kdctl train coco --devices 0,1,2,3,4,5,6,7[/]  (8 GPUs, through torchrun)
    """
    from kdctl.engine.trainer import Trainer, default_run_dir
    from kdctl.recipe import load_recipe

    if device:
        overrides = [*overrides, f"runtime.device={device}"]
    resolved = load_recipe(recipe, overrides)
    run_dir = out_dir or default_run_dir(recipe, resolved, model)
    maybe_launch(nproc, devices, nnodes, node_rank, rdzv_endpoint, max_restarts, run_dir)
    trainer = Trainer(resolved, run_dir, resume=resume, max_steps=max_steps, which=model, dry_run=dry_run, overwrite=overwrite)
    start_run(trainer, dry_run, as_json)
    summary = trainer.fit()
    finish_run(summary, run_dir, as_json, trainer.main)
    stopped_exit(summary)


def distill_overrides(method: Optional[str], teacher: Optional[str]) -> list[str]:
    """The recipe overrides that --method and --teacher stand for (before the user's --set)."""
    from kdctl.recipe import METHOD_NAMES

    pre = []
    if method is not None:
        names = [m.strip() for m in method.split(",") if m.strip()]
        if names == ["none"]:
            names = []
        bad = [m for m in names if m not in METHOD_NAMES]
        if bad:
            raise KdctlError(f"--method: unknown method {bad[0]!r}; use {', '.join(METHOD_NAMES)} or none")
        pre.append("distill.losses=[" + ", ".join("{type: %s}" % m for m in names) + "]")
    if teacher:
        pre.append(f"model.teacher_checkpoint={json.dumps(str(teacher))}")
    return pre


@cli_errors
def distill_cmd(
    recipe: str = RECIPE,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="A kdctl checkpoint of the teacher (e.g. RUN/best.safetensors); its stored recipe says what it is. Overrides model.teacher."),
    method: Optional[str] = typer.Option(None, "--method", help="Replace distill.losses by these KD methods with their default options, comma-separated (crosskd, ssim, pkd, ...), or none; an unknown name lists them all."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field: --set distill.losses.0.weight=2 (repeatable)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: {train.out_dir}/{recipe name}-{methods})."),
    resume: bool = RESUME,
    overwrite: bool = OVERWRITE,
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps."),
    device: Optional[str] = DEVICE,
    as_json: bool = SUMMARY_JSON,
    dry_run: bool = DRY_RUN,
    nproc: Optional[int] = NPROC, devices: Optional[str] = DEVICES, nnodes: int = NNODES,
    node_rank: Optional[int] = NODE_RANK, rdzv_endpoint: Optional[str] = RDZV, max_restarts: int = RESTARTS,
) -> None:
    """Distil the recipe's student from a frozen teacher (CrossKD, SSIM, PKD, feature or prediction mimicking).

    Example: [bold]kdctl train demo --model teacher --out runs/teacher[/]
             [bold]kdctl distill demo --teacher runs/teacher/best.safetensors --method crosskd[/]
    """
    from kdctl.distill.trainer import DistillTrainer, checked_teacher_config, default_distill_dir
    from kdctl.recipe import load_recipe

    pre = distill_overrides(method, teacher)
    if device:
        overrides = [*overrides, f"runtime.device={device}"]
    resolved = load_recipe(recipe, [*pre, *overrides])
    run_dir = out_dir or default_distill_dir(recipe, resolved)
    if resolved.distill.losses and launches(nproc, devices, nnodes):
        checked_teacher_config(resolved)  # a bad pair fails here once, not in every worker (one process: in the trainer)
    maybe_launch(nproc, devices, nnodes, node_rank, rdzv_endpoint, max_restarts, run_dir)
    trainer = DistillTrainer(resolved, run_dir, resume=resume, max_steps=max_steps, dry_run=dry_run, overwrite=overwrite)
    start_run(trainer, dry_run, as_json)
    summary = trainer.fit()
    finish_run(summary, run_dir, as_json, trainer.main)
    stopped_exit(summary)


@cli_errors
def compare_cmd(
    runs: list[Path] = typer.Argument(..., help="Run directories (the --out folders of kdctl train)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw AP per epoch and total loss per step of the runs side by side into this PNG."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --plot file if it exists."),
) -> None:
    """Runs side by side: model, size, speed and best COCO AP.

    Example: [bold]kdctl compare runs/shapes-teacher runs/shapes[/]
             [bold]kdctl compare runs/baseline runs/crosskd --plot curves.png[/]
    """
    from kdctl.runs.summary import summarize_run

    if plot is not None:
        from kdctl.artifact.rundir import check_writable_target

        check_writable_target(plot, force, "--plot")
    rows = [summarize_run(r) for r in runs]
    if plot is not None:
        from kdctl.runs.curves import plot_runs

        plot_runs(runs, plot)
    if as_json:
        return print_json(rows)
    for r in rows:
        if r["malformed_lines"]:
            n = r["malformed_lines"]
            say(err, "warning", "yellow", f"{Path(r['run']) / 'metrics.jsonl'}: skipped {n} malformed line{'s' * (n != 1)} "
                                          "(cut short, or fields that are not what a record holds)")
    render_runs(rows)
    if plot is not None:
        say(out, "wrote", "green", f"{plot} (AP per epoch, loss per step)")


def render_runs(rows: list[dict]) -> None:
    table = Table(title="runs", title_justify="left")
    for i, name in enumerate(("run", "model", "distill", "params", "steps", "train", "img/s", "AP", "AP50", "AP75")):
        table.add_column(name, no_wrap=i < 4, justify="left" if i < 3 else "right")

    def pct(row, name):
        v = (row["best"] or {}).get(name)
        return "—" if not isinstance(v, (int, float)) or v < 0 else f"{100 * v:.1f}"

    for r in rows:
        params = "—" if r["params_m"] is None else f"{r['params_m']:.2f}M"
        speed = "—" if r["img_s"] is None else f"{r['img_s']:.1f}"
        took = "—" if r["train_s"] is None else f"{r['train_s'] / 60:.1f} min"
        cells = (Path(r["run"]).name, f"{r['head']} · {r['backbone']}", r["distill"] or "—", params, str(r["steps"]),
                 took, speed, *(pct(r, n) for n in ("AP", "AP50", "AP75")))
        table.add_row(*(Text(c) for c in cells))  # run names are text, not markup
    out.print(table)
