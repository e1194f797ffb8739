"""The ``kdctl`` command line: parse, call one function, render the result.

Errors a user can cause raise :class:`kdctl.errors.KdctlError`; :func:`_cli` turns them into
one red line on stderr and exit code 2 (``kdctl --debug ...`` shows the traceback instead).
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kdctl import __version__
from kdctl.errors import KdctlError

# a pipe or CI log gets 120 columns rather than rich's 80, so that tables stay readable
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="kdctl",
    help="Make small, fast object detectors by knowledge distillation from big ones.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect and convert datasets.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(data_app, name="data")

_state = {"debug": False}

SPLIT_HELP = "train, val or all. COCO .json: the file itself; VOC sets without a val list use test."


def _cli(fn):
    """Run a command; a KdctlError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdctlError as exc:
            if _state["debug"]:
                raise
            if os.environ.get("RANK", "0") == "0":  # in a distributed run, every rank fails alike: say it once
                err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"kdctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """kdctl: teacher in, small exported student out. Start with `kdctl recipes list`."""
    _state["debug"] = debug


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _write_json(path: Path, obj) -> None:
    """Write atomically (temp file + rename), so a failure never leaves half a file."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise KdctlError(f"{path}: folder {path.parent} does not exist; create it or choose another path")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _split(value: str) -> Optional[str]:
    if value not in ("train", "val", "all"):
        raise KdctlError(f"--split: expected train, val or all, got {value!r}")
    return None if value == "all" else value


# ============================================================================= recipes
@recipes_app.command("list")
@_cli
def recipes_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the built-in recipes.

    Example: [bold]kdctl recipes list[/]
    """
    import yaml

    from kdctl.recipe import builtin_recipes

    rows = []
    for name, path in builtin_recipes().items():
        raw = yaml.safe_load(path.read_text()) or {}
        rows.append({"name": name, "path": str(path), "description": str(raw.get("description", ""))})
    if as_json:
        return _print_json(rows)
    table = Table("recipe", "description", title="built-in recipes")
    for row in rows:
        table.add_row(row["name"], row["description"])
    out.print(table)


@recipes_app.command("show")
@_cli
def recipes_show(
    name: str = typer.Argument(..., help="Built-in recipe name or recipe file."),
    resolved: bool = typer.Option(False, "--resolved", help="Merge `extends`, apply --set and fill every default."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field: --set train.epochs=24 (repeatable)."),
) -> None:
    """Print a recipe as written, or fully resolved with --resolved.

    Example: [bold]kdctl recipes show shapes --resolved --set train.epochs=2[/]
    """
    from kdctl.recipe import find_recipe, load_recipe

    if resolved or overrides:
        sys.stdout.write(load_recipe(name, overrides).to_yaml())
    else:
        sys.stdout.write(find_recipe(name).read_text())


@recipes_app.command("validate")
@_cli
def recipes_validate(
    file: str = typer.Argument(..., help="Recipe file (or built-in name)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field: --set data.batch_size=4 (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (the resolved recipe)."),
) -> None:
    """Check a recipe against the schema; print what is wrong in one line (exit 2) or 'ok'.

    Example: [bold]kdctl recipes validate my_recipe.yaml --set train.lr=0.02[/]
    """
    from kdctl.recipe import load_recipe

    recipe = load_recipe(file, overrides)
    if as_json:
        return _print_json({"valid": True, "recipe": recipe.model_dump(mode="json")})
    out.print(f"[green]ok[/] {file}")


# ============================================================================= data
@data_app.command("stats")
@_cli
def data_stats(
    data: str = typer.Argument(..., help="shapes, a COCO .json, a YOLO data.yaml, a VOC folder or a recipe."),
    split: str = typer.Option("all", "--split", help=SPLIT_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable samples (counted) instead of failing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Images, boxes, classes, box-size histogram and what loading repaired.

    Example: [bold]kdctl data stats ../shared/data/coco8/data.yaml --split val[/]
    """
    from kdctl.data import open_dataset

    with err.status(f"loading {data}"):
        ds = open_dataset(data, _split(split), skip_bad=skip_bad, check_images="auto")
        stats = ds.stats()
    if as_json:
        return _print_json(stats)
    _render_stats(stats)


def _render_stats(stats: dict) -> None:
    summary = Table.grid(padding=(0, 2))
    summary.add_row("source", f"{stats['source']} ({stats['format']})")
    summary.add_row("images", f"{stats['images']} ({stats['images_without_boxes']} without boxes)")
    summary.add_row("boxes", f"{stats['boxes']} (+{stats['ignore_regions']} ignore regions)")
    summary.add_row("classes", str(stats["classes"]))
    sizes = stats["coco_sizes"]
    summary.add_row("COCO sizes", f"small {sizes['small']} · medium {sizes['medium']} · large {sizes['large']}")
    rep = stats["repairs"]
    summary.add_row("repaired", f"{rep['boxes_clipped']} boxes clipped · {rep['boxes_degenerate_dropped']} degenerate dropped · {rep['samples_skipped']} samples skipped")
    out.print(summary)
    hist = Table("box side √area (px)", "boxes", "", title="box sizes", title_justify="left")
    peak = max(stats["size_histogram"].values(), default=0) or 1
    for edge, n in stats["size_histogram"].items():
        hist.add_row(edge, str(n), "█" * round(30 * n / peak))
    out.print(hist)
    per = Table("class", "boxes", title="boxes per class", title_justify="left")
    for name, n in sorted(stats["per_class"].items(), key=lambda kv: -kv[1]):
        per.add_row(name, str(n))
    out.print(per)
    for note in rep["notes"]:
        err.print(f"[cyan]note[/] {note}", soft_wrap=True)
    for item in rep["skipped"][:20]:
        err.print(f"[yellow]skipped[/] {item['file']}: {item['reason']}", soft_wrap=True)


@data_app.command("export-coco")
@_cli
def data_export_coco(
    data: str = typer.Argument(..., help="shapes, a COCO .json, a YOLO data.yaml, a VOC folder or a recipe."),
    out_path: Path = typer.Argument(..., metavar="OUT", help="COCO JSON file to write."),
    split: str = typer.Option("all", "--split", help=SPLIT_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable samples (counted) instead of failing."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
) -> None:
    """Write any supported dataset as COCO JSON (shapes also writes its images as PNG next to it).

    Example: [bold]kdctl data export-coco shapes out/shapes_val.json --split val[/]
    """
    from kdctl.data import open_dataset
    from kdctl.data.export import export_coco

    if out_path.exists() and not force:
        raise KdctlError(f"{out_path}: already exists; pass --force to overwrite it or choose another path")
    ds = open_dataset(data, _split(split), skip_bad=skip_bad)
    result = export_coco(ds, out_path)
    where = f"; images in {result['image_dir']}" if result.get("image_dir") else ""
    out.print(f"[green]wrote[/] {out_path}: {result['images']} images, {result['annotations']} annotations, {result['categories']} categories{where}", soft_wrap=True)


# ============================================================================= train / eval
# launch options shared by train and distill: more than one process goes through torchrun
NPROC = typer.Option(None, "--nproc", min=1, help="Processes on this node (CPU: gloo; CUDA: one per device). Starts the same command through torch.distributed.run.")
DEVICES = typer.Option(None, "--devices", help="CUDA devices to train on, e.g. 0,1,2,3: one process each, through torch.distributed.run.")
NNODES = typer.Option(1, "--nnodes", min=1, help="Nodes in the job (run the same command on each).")
NODE_RANK = typer.Option(None, "--node-rank", min=0, help="This node's rank (static rendezvous at --rdzv-endpoint); omit for elastic c10d rendezvous.")
RDZV = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous (node 0) for several nodes.")
RESTARTS = typer.Option(0, "--max-restarts", min=0, help="torchrun restarts a failed group this many times; it resumes from the last checkpoint.")


def _maybe_launch(nproc, devices, nnodes, node_rank, rdzv_endpoint, max_restarts, run_dir: Path) -> None:
    """Hand the command to torchrun when it asks for more than one process and this process is
    not already a worker; then exit with torchrun's exit code."""
    from kdctl.engine.launch import in_worker, launch, program_args

    if in_worker() or ((nproc or 1) <= 1 and devices is None and nnodes <= 1):
        return
    code = launch(program_args(), nproc=nproc, devices=devices, nnodes=nnodes, node_rank=node_rank,
                  rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts, run_dir=run_dir)
    raise typer.Exit(code)


def _finish_run(summary: dict, run_dir: Path, as_json: bool, rank0: bool) -> None:
    """Render a run's summary (rank 0 only); a signal-stopped run prints how to resume it."""
    from kdctl.engine.distributed import shutdown

    shutdown()
    if not rank0:
        return
    if as_json:
        return _print_json(summary)
    if summary.get("stopped"):
        import shlex

        from kdctl.engine.launch import program_args

        args = program_args()
        args = [*args, *([] if "--out" in args or any(a.startswith("--out=") for a in args) else ["--out", str(run_dir)]),
                *([] if "--resume" in args else ["--resume"])]
        out.print(f"[yellow]stopped[/] by {summary['stopped']} at step {summary['step']}; checkpoint {run_dir}/last.safetensors", soft_wrap=True)
        out.print(f"resume with: kdctl {shlex.join(args)}", soft_wrap=True, markup=False)
        return
    best = "—" if summary["best_ap"] < 0 else f"{100 * summary['best_ap']:.1f}"
    out.print(f"[green]done[/] {summary['step']} steps · best AP {best} · {run_dir}", soft_wrap=True)


@app.command("train")
@_cli
def train_cmd(
    recipe: str = typer.Argument(..., help="Built-in recipe name or recipe file."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field: --set train.epochs=24 (repeatable)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: {train.out_dir}/{recipe name})."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run directory from its last checkpoint."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps (the schedule still spans every epoch)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (overrides runtime.device)."),
    model: str = typer.Option("student", "--model", help="Which of the recipe's models to train: student or teacher."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
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
    _maybe_launch(nproc, devices, nnodes, node_rank, rdzv_endpoint, max_restarts, run_dir)
    trainer = Trainer(resolved, run_dir, resume=resume, max_steps=max_steps, which=model)
    summary = trainer.fit()
    _finish_run(summary, run_dir, as_json, trainer.main)


METHODS = ("crosskd", "ssim", "pkd", "feat_l2", "feat_l1", "pred_mimic")


@app.command("distill")
@_cli
def distill_cmd(
    recipe: str = typer.Argument(..., help="Built-in recipe name or recipe file."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="A kdctl checkpoint of the teacher (e.g. RUN/best.safetensors); its stored recipe says what it is. Overrides model.teacher."),
    method: Optional[str] = typer.Option(None, "--method", help="Replace distill.losses by these methods with their default options, comma-separated: crosskd, ssim, pkd, feat_l2, feat_l1, pred_mimic, or none."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field: --set distill.losses.0.weight=2 (repeatable)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: {train.out_dir}/{recipe name}-{methods})."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run directory from its last checkpoint."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (overrides runtime.device)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
    nproc: Optional[int] = NPROC, devices: Optional[str] = DEVICES, nnodes: int = NNODES,
    node_rank: Optional[int] = NODE_RANK, rdzv_endpoint: Optional[str] = RDZV, max_restarts: int = RESTARTS,
) -> None:
    """Distil the recipe's student from a frozen teacher (CrossKD, SSIM, PKD, feature or prediction mimicking).

    Example: [bold]kdctl train demo --model teacher --out runs/teacher[/]
             [bold]kdctl distill demo --teacher runs/teacher/best.safetensors --method crosskd[/]
    """
    from kdctl.distill.trainer import DistillTrainer, checked_teacher_config, default_distill_dir
    from kdctl.recipe import load_recipe

    pre = []
    if method is not None:
        names = [m.strip() for m in method.split(",") if m.strip()]
        if names == ["none"]:
            names = []
        bad = [m for m in names if m not in METHODS]
        if bad:
            raise KdctlError(f"--method: unknown method {bad[0]!r}; use {', '.join(METHODS)} or none")
        pre.append("distill.losses=[" + ", ".join("{type: %s}" % m for m in names) + "]")
    if teacher:
        pre.append(f"model.teacher_checkpoint={json.dumps(str(teacher))}")
    if device:
        overrides = [*overrides, f"runtime.device={device}"]
    resolved = load_recipe(recipe, [*pre, *overrides])
    run_dir = out_dir or default_distill_dir(recipe, resolved)
    if resolved.distill.losses:
        checked_teacher_config(resolved)  # a bad pair fails here once, not in every worker
    _maybe_launch(nproc, devices, nnodes, node_rank, rdzv_endpoint, max_restarts, run_dir)
    trainer = DistillTrainer(resolved, run_dir, resume=resume, max_steps=max_steps)
    summary = trainer.fit()
    _finish_run(summary, run_dir, as_json, trainer.main)


@app.command("compare")
@_cli
def compare_cmd(
    runs: list[Path] = typer.Argument(..., help="Run directories (the --out folders of kdctl train)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Runs side by side: model, size, speed and best COCO AP.

    Example: [bold]kdctl compare runs/shapes-teacher runs/shapes[/]
    """
    from kdctl.runs import summarize_run

    rows = [summarize_run(r) for r in runs]
    if as_json:
        return _print_json(rows)
    table = Table(title="runs", title_justify="left")
    for i, name in enumerate(("run", "model", "distill", "params", "steps", "train", "img/s", "AP", "AP50", "AP75")):
        table.add_column(name, no_wrap=i < 4, justify="left" if i < 3 else "right")

    def pct(row, name):
        v = (row["best"] or {}).get(name)
        return "—" if v is None or v < 0 else f"{100 * v:.1f}"

    for r in rows:
        params = "—" if r["params_m"] is None else f"{r['params_m']:.2f}M"
        speed = "—" if r["img_s"] is None else f"{r['img_s']:.1f}"
        took = "—" if r["train_s"] is None else f"{r['train_s'] / 60:.1f} min"
        table.add_row(Path(r["run"]).name, f"{r['head']} · {r['backbone']}", r["distill"] or "—", params, str(r["steps"]),
                      took, speed, *(pct(r, n) for n in ("AP", "AP50", "AP75")))
    out.print(table)


# ============================================================================= fetch
@app.command("fetch")
@_cli
def fetch_cmd(
    target: Optional[str] = typer.Argument(None, metavar="[NAME|URL]", help="A teacher of `kdctl fetch --list`, or a URL (with --sha256)."),
    list_: bool = typer.Option(False, "--list", help="Show the built-in teacher registry."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected SHA-256 of the file (full 64 hex digits, or a prefix of at least 8)."),
    from_file: Optional[Path] = typer.Option(None, "--from-file", help="Convert a local file instead of downloading (offline); needs --as."),
    as_name: Optional[str] = typer.Option(None, "--as", help="The registry entry whose architecture the file or URL holds."),
    force: bool = typer.Option(False, "--force", help="Download and convert again even if the teacher is in the cache."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Download a published COCO teacher (torchvision, MMDetection), verify it and convert it to a kdctl checkpoint.

    The checkpoint lands in $KDCTL_HOME/teachers (default ~/.cache/kdctl) and works with
    `kdctl eval CKPT` and `kdctl distill RECIPE --teacher CKPT`.

    Example: [bold]kdctl fetch gfl_r101_fpn_mstrain_2x_coco[/]
             [bold]kdctl fetch --from-file retinanet_resnet50_fpn_coco-eeacb38b.pth --as retinanet_resnet50_fpn[/]
    """
    from kdctl.hub import registry_rows

    if list_:
        rows = registry_rows()
        if as_json:
            return _print_json(rows)
        table = Table(title="teachers (COCO val2017 box AP as published)", title_justify="left")
        for i, col in enumerate(("name", "source", "detector", "backbone", "schedule", "AP", "size")):
            table.add_column(col, no_wrap=i > 0, overflow="fold", justify="right" if col in ("AP", "size") else "left")
        for r in rows:
            size = "—" if r["size_mb"] is None else f"{r['size_mb']:.0f} MB"
            table.add_row(r["name"], r["source"], r["detector"], r["backbone"], r["schedule"], f"{r['box_ap']:.1f}", size)
        out.print(table)
        err.print("hashes: the publishers give only the first 8 hex digits of each file's SHA-256 (in its name); "
                  "kdctl checks those", soft_wrap=True)
        return
    from kdctl.hub.fetch import fetch

    info = fetch(target, sha256=sha256, from_file=from_file, as_name=as_name, force=force, progress=not as_json)
    if as_json:
        return _print_json(info)
    if info["cached"]:
        out.print(f"[green]cached[/] {info['name']}: {info['path']} (--force to fetch again)", soft_wrap=True)
        return
    how = "downloaded" if info["downloaded"] else "read"
    check = "SHA-256" if info["checked"] == "sha256" else f"SHA-256 prefix {info['sha256'][:8]}"
    out.print(f"[green]converted[/] {info['name']}: {how} {info['file']} ({check} ok), "
              f"{info['params'] / 1e6:.1f}M parameters -> {info['path']}", soft_wrap=True)
    out.print(f"use it: kdctl eval {info['path']} --data DATA · kdctl distill RECIPE --teacher {info['path']}", soft_wrap=True)


@app.command("eval")
@_cli
def eval_cmd(
    checkpoint: Optional[Path] = typer.Argument(None, help="A kdctl checkpoint (.safetensors) or run directory; omit with --predictions."),
    data: Optional[str] = typer.Option(None, "--data", help="Ground truth: a COCO .json, a YOLO data.yaml, a VOC folder, shapes or a recipe (default for a checkpoint: its recipe's data)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="COCO results JSON: [{image_id, category_id, bbox [x,y,w,h], score}]."),
    split: str = typer.Option("val", "--split", help=SPLIT_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics as JSON to this file ('-' for stdout)."),
    save_predictions: Optional[Path] = typer.Option(None, "--save-predictions", help="Write the checkpoint's detections as COCO results JSON."),
    per_class: bool = typer.Option(False, "--per-class", help="Add AP per class."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per inference batch (default: the recipe's eval.batch_size)."),
) -> None:
    """COCO box metrics (AP, AP50, AP75, APs/m/l, AR1/10/100) of a checkpoint or a predictions file.

    Examples: [bold]kdctl eval runs/shapes/best.safetensors --data shapes[/]
              [bold]kdctl eval --data instances_val2017.json --predictions dets.json --per-class[/]
    """
    if (checkpoint is None) == (predictions is None):
        raise KdctlError("give either a CHECKPOINT or --predictions FILE (not both, not neither)")
    if save_predictions is not None and save_predictions.exists():
        raise KdctlError(f"{save_predictions}: already exists; remove it or choose another path")
    if predictions is not None:
        from kdctl.evaluate import evaluate_data

        if data is None:
            raise KdctlError("--predictions needs --data: the ground truth to score them against")
        with err.status("evaluating"):
            result = evaluate_data(data, predictions, split=_split(split), per_class=per_class)
    else:
        from kdctl.engine.inference import evaluate_checkpoint

        if split == "all":
            raise KdctlError("--split: a checkpoint is evaluated on train or val, not all")
        result = evaluate_checkpoint(checkpoint, data, split=split, device=device, batch_size=batch_size, per_class=per_class)
        preds = result.pop("predictions")
        if save_predictions is not None:
            _write_json(save_predictions, preds)
    if json_out is not None and str(json_out) == "-":
        return _print_json(result)
    _render_metrics(result, per_class)
    if json_out is not None:
        _write_json(json_out, result)
        out.print(f"[green]wrote[/] {json_out}")
    if save_predictions is not None:
        out.print(f"[green]wrote[/] {save_predictions}")


def _render_metrics(result: dict, per_class: bool) -> None:
    table = Table(title=f"COCO box metrics · {result['num_images']} images · {result['num_predictions']} predictions", title_justify="left")
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
    for name in names:
        table.add_column(name, justify="right")
    # COCOeval reports -1 where the ground truth has no object of that size: show a dash.
    table.add_row(*("—" if result["metrics"][n] < 0 else f"{100 * result['metrics'][n]:.1f}" for n in names))
    out.print(table)
    if per_class and result.get("per_class"):
        per = Table("class", "AP", title="AP per class", title_justify="left")
        for cls, ap in result["per_class"].items():
            per.add_row(cls, "—" if ap is None else f"{100 * ap:.1f}")
        out.print(per)


# ============================================================================= export
@app.command("export")
@_cli
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A kdctl checkpoint (.safetensors) or run directory (its last.safetensors)."),
    fmt: str = typer.Option(..., "--format", help="safetensors, onnx or torchscript."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="File to write (default: beside the checkpoint, e.g. RUN/best.onnx)."),
    opset: Optional[int] = typer.Option(None, "--opset", min=1, help="ONNX opset (default 18; 17 is converted down)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Any batch size (onnx: symbolic batch; torchscript: traced at 2); verified at batch 2 too."),
    input_size: Optional[tuple[int, int]] = typer.Option(None, "--input-size", metavar="H W", help="Input height and width in pixels, multiples of 32 (default: the recipe's short and max side)."),
    half: bool = typer.Option(False, "--half", help="float16 weights (and float16 compute in onnx/torchscript); verified at a looser tolerance."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare with PyTorch on real images; a failed check writes nothing and exits 2."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="A teacher checkpoint to report beside the student (params, FLOPs, latency)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image file or folder to verify on (default: ../shared/data photos + the checkpoint's val data)."),
    runs: int = typer.Option(20, "--runs", min=0, help="Timed runs per latency (median after 3 warm-up runs); 0 skips latency."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Export a trained detector (no teacher, no adapters) as safetensors, ONNX or TorchScript; verify it against PyTorch and report size, FLOPs and latency.

    Example: [bold]kdctl export runs/shapes/best.safetensors --format onnx --dynamic-batch --teacher runs/shapes-teacher/best.safetensors[/]
    """
    from kdctl.export import VerificationFailed, export_detector
    from kdctl.export.report import detections_line, report_table, verify_table

    try:
        with err.status(f"exporting {checkpoint} as {fmt}"):
            result = export_detector(checkpoint, fmt, out=out_path, opset=opset, dynamic_batch=dynamic_batch, input_size=input_size,
                                     half=half, verify=verify, teacher=teacher, images=images, runs=runs, force=force)
    except VerificationFailed as exc:
        if not as_json:  # the evidence, then the one error line
            err.print(verify_table(exc.verify))
            err.print(detections_line(exc.verify), soft_wrap=True)
        raise
    if as_json:
        return _print_json(result)
    if result["dropped"]:
        err.print(f"[cyan]note[/] dropped {result['dropped']} keys that are not the detector's", soft_wrap=True)
    if result["verify"] is not None:
        out.print(verify_table(result["verify"]))
        out.print(detections_line(result["verify"]), soft_wrap=True)
    else:
        err.print("[yellow]not verified[/] (--no-verify)")
    out.print(report_table(result["report"], tuple(result["input_size"])))
    size = result["report"]["student"]["file_bytes"] / 2**20
    out.print(f"[green]wrote[/] {result['out']} ({result['format']}, {result['dtype']}, {size:.2f} MiB)", soft_wrap=True)


# ============================================================================= analyze-conflict
@app.command("analyze-conflict")
@_cli
def analyze_conflict_cmd(
    teacher: list[str] = typer.Option(..., "--teacher", help="A kdctl checkpoint of a teacher (repeatable); its stored recipe says what it is."),
    student: str = typer.Option(..., "--student", help="Recipe whose model.student gives the assigner, priors and targets (and the resize)."),
    data: Optional[str] = typer.Option(None, "--data", help="shapes, a COCO .json, a YOLO data.yaml, a VOC folder or a recipe (default: the student recipe's data)."),
    student_checkpoint: Optional[str] = typer.Option(None, "--student-checkpoint", help="A (distilled) student: also measure its own and its cross-head predictions against each teacher."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field of the student recipe: --set runtime.threads=1 (repeatable)."),
    split: str = typer.Option("val", "--split", help=SPLIT_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: the recipe's runtime.device)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per batch (default: the recipe's eval.batch_size)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Use only the first N images."),
    threshold: float = typer.Option(0.5, "--threshold", help="A location conflicts when its discrepancy is above this."),
    floor: float = typer.Option(0.05, "--floor", help="Non-trivial: the target or the teacher's score exceeds this."),
    per_class: bool = typer.Option(False, "--per-class", help="Every (location, class) pair is a unit, instead of the max over classes per location."),
    quality: str = typer.Option("teacher", "--quality", help="GFL students' soft target: IoU of the teacher's box, the student's own box (with --student-checkpoint) or one (one-hot)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the histograms and the conflict ratio per level as PNG."),
    visualize: int = typer.Option(0, "--visualize", min=0, help="Write N images of target / teacher score / discrepancy maps (needs --out)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the --visualize images."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Measure how far each teacher's scores are from the targets the student's assigner gives (CrossKD's target conflict).

    Example: [bold]kdctl analyze-conflict --teacher runs/gfl/best.safetensors --teacher runs/retina/best.safetensors --student demo --plot conflict.png[/]
    """
    from kdctl.analysis.report import tables
    from kdctl.analysis.run import analyze_conflict

    if visualize and out_dir is None:
        raise KdctlError("--visualize N needs --out DIR: the folder for the images")
    for target in (json_out if json_out is not None and str(json_out) != "-" else None, plot):
        if target is not None and target.exists() and not force:
            raise KdctlError(f"{target}: already exists; pass --force to overwrite it or choose another path")
        if target is not None and not target.parent.exists():
            raise KdctlError(f"{target}: folder {target.parent} does not exist; create it or choose another path")
    if visualize and out_dir.exists() and any(out_dir.glob("conflict_*.png")) and not force:
        raise KdctlError(f"{out_dir}: already holds conflict_*.png images; pass --force to overwrite them or choose another folder")
    report, samples = analyze_conflict(
        teacher, student, data, student_checkpoint=student_checkpoint, overrides=overrides, split=_split(split),
        device=device, batch_size=batch_size, max_images=max_images, threshold=threshold, floor=floor,
        per_class=per_class, quality=quality, visualize=visualize)
    if plot is not None:
        from kdctl.analysis.plot import plot_report

        plot_report(report, plot)
    if visualize:
        from kdctl.analysis.plot import write_visualizations

        report["visualizations"] = [str(p) for p in write_visualizations(samples, out_dir, report)]
    if json_out is not None and str(json_out) == "-":
        return _print_json(report)
    for table in tables(report):
        out.print(table)
    for t in report["teachers"]:
        for note in t["notes"]:
            err.print(f"[cyan]note[/] {t['label']}: {note}", soft_wrap=True)
    if json_out is not None:
        from kdctl.engine.checkpoint import atomic_write_bytes

        atomic_write_bytes(json_out, (json.dumps(report, indent=2) + "\n").encode())
    for written in [p for p in (json_out, plot) if p is not None] + ([out_dir] if visualize else []):
        out.print(f"[green]wrote[/] {written}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
