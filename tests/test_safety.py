"""Nothing lost, nothing crashes: a corpus of hostile inputs across every command (each ends in
exit 2 and one line naming the culprit, no traceback, no pre-existing file changed, no temporary
file left), run folders that are never reused by accident, no litter after signals and full
disks, and honest exit codes.

A new command joins the corpus with one line in COMMANDS (for each kind of input it reads) or
OUTPUTS (for a file it writes); the hostile inputs of each kind are in tests/hostile/.
"""
import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from kdctl.cli import app
from conftest import ROOT

import hostile

# the pickled state file of the corpus is refused by weights_only; torch warns about its protocol first
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")
runner = CliRunner()
TINY = [
    "data.shapes.train_images=8", "data.shapes.val_images=4", "data.shapes.image_size=64", "data.short_side=64",
    "data.max_side=64", "data.batch_size=4", "data.num_workers=0", "model.student.backbone=test_resnet",
    "model.student.fpn_channels=32", "model.student.feat_channels=32", "model.student.stacked_convs=1",
    "model.teacher.backbone=test_resnet", "model.teacher.fpn_channels=32", "model.teacher.feat_channels=32",
    "model.teacher.stacked_convs=1", "train.epochs=1", "train.warmup_iters=2", "train.log_every=1", "runtime.threads=1",
]


def tiny_recipe_text(**more: str) -> str:
    """A recipe file: the demo recipe made tiny (the demo has a teacher, so distill works too)."""
    import yaml

    tree: dict = {}
    for item in [*TINY, *(f"{k}={v}" for k, v in more.items())]:
        key, value = item.split("=", 1)
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return "extends: demo\n" + yaml.safe_dump(tree, sort_keys=False)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """What the commands need besides the hostile input: a tiny recipe file, a checkpoint of it
    (2 steps), an image, a COCO ground truth and a predictions file."""
    from PIL import Image

    from kdctl.engine.trainer import Trainer
    from kdctl.recipe import load_recipe

    root = tmp_path_factory.mktemp("ctx")
    recipe = root / "tiny.yaml"
    recipe.write_text(tiny_recipe_text())
    Trainer(load_recipe(str(recipe)), root / "run", quiet=True, max_steps=2).fit()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(root / "photo.png")
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    coco = hostile._coco(root, "gt.json")
    preds = root / "preds.json"
    preds.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]))
    return SimpleNamespace(root=root, recipe=recipe, ckpt=root / "run" / "last.safetensors", image=root / "photo.png",
                           coco=coco, preds=preds)


# ---------------------------------------------------------------------------------- the corpus
# (command, the kind of input it reads (a key of hostile.SLOTS), argv from (tmp, hostile path, ctx)
#  [, hostile inputs of that kind the command rightly accepts])
COMMANDS = [
    ("recipes validate", "recipe", lambda t, p, c: ["recipes", "validate", p]),
    ("recipes show --resolved", "recipe", lambda t, p, c: ["recipes", "show", p, "--resolved"]),
    ("recipes show", "recipe", lambda t, p, c: ["recipes", "show", p],  # shows the text as written: only unreadable text fails
     set(hostile.RECIPES) - {"latin-1 text", "utf-16 text", "binary garbage", "a folder named .yaml"}),
    ("train --dry-run", "recipe", lambda t, p, c: ["train", p, "--dry-run", "--out", t / "out"]),
    ("distill --dry-run", "recipe", lambda t, p, c: ["distill", p, "--dry-run", "--out", t / "out"]),
    ("eval CHECKPOINT", "checkpoint", lambda t, p, c: ["eval", p, "--data", c.recipe, "--device", "cpu"]),
    ("export", "checkpoint", lambda t, p, c: ["export", p, "--format", "safetensors", "--out", t / "o.safetensors", "--runs", "0"]),
    ("predict", "checkpoint", lambda t, p, c: ["predict", p, c.image, "--out", t / "pred", "--device", "cpu"]),
    ("export --end-to-end", "checkpoint", lambda t, p, c: ["export", p, "--format", "onnx", "--end-to-end", "--out",
                                                          t / "o.onnx", "--runs", "0"]),
    ("export --int8", "checkpoint", lambda t, p, c: ["export", p, "--format", "onnx", "--int8", "--calibration", c.recipe,
                                                     "--out", t / "o.onnx", "--runs", "0"]),
    ("eval MODEL.onnx", "model", lambda t, p, c: ["eval", p, "--data", c.recipe]),
    ("predict MODEL.onnx", "model", lambda t, p, c: ["predict", p, c.image, "--out", t / "pred"]),
    ("distill --teacher", "checkpoint", lambda t, p, c: ["distill", c.recipe, "--teacher", p, "--method", "pkd", "--dry-run",
                                                         "--out", t / "out"],
     {"num_classes not a number"}),  # the class names in the metadata say how many
    ("analyze-conflict --teacher", "checkpoint", lambda t, p, c: ["analyze-conflict", "--teacher", p, "--student", c.recipe,
                                                                  "--max-images", "1", "--device", "cpu"]),
    ("data stats", "data", lambda t, p, c: ["data", "stats", p]),
    ("data export-coco", "data", lambda t, p, c: ["data", "export-coco", p, t / "out" / "x.json"]),
    ("eval --data", "data", lambda t, p, c: ["eval", "--data", p, "--predictions", c.preds, "--split", "all"],
     {"COCO missing image with markup name", "COCO truncated JPEG", "COCO image width a string"}),  # scoring reads no image
    ("eval --predictions", "predictions", lambda t, p, c: ["eval", "--data", c.coco, "--predictions", p, "--split", "all"]),
    ("compare", "run", lambda t, p, c: ["compare", p], {"last.state.pt a pickle"}),  # compare reads no training state
    ("fetch URL", "url", lambda t, p, c: ["fetch", p, "--sha256", "0123456789abcdef", "--as", "retinanet_resnet50_fpn"]),
    ("train --resume", "run", lambda t, p, c: ["train", c.recipe, "--resume", "--out", p]),
]
CASES = [pytest.param(cmd, slot, argv, name, make, id=f"{cmd}: {name}")
         for cmd, slot, argv, *accepted in COMMANDS for name, make in hostile.SLOTS[slot].items()
         if name not in (accepted[0] if accepted else ())]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` -> its SHA-256 (symlinks not followed)."""
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                if p.is_file() and not p.is_symlink():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temp_files(*roots: Path) -> list[str]:
    return [str(Path(d) / f) for root in roots for d, _, files in os.walk(root) for f in files if f.endswith(".tmp")]


def invoke(argv, **kw):
    return runner.invoke(app, [str(a) for a in argv], **kw)


def assert_one_line(result, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one line on stderr containing every needle, no traceback."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def shown(path) -> str:
    """How a path appears in the one line (control characters escaped)."""
    return str(path).replace("\n", "\\n")


@pytest.mark.parametrize("cmd, slot, argv, name, make", CASES)
def test_a_hostile_input_ends_in_one_line_exit_2_and_changes_nothing(tmp_path, ctx, cmd, slot, argv, name, make):
    base = ctx.ckpt if slot in ("checkpoint", "run") else None
    path, needle = make(tmp_path, base)
    if slot == "run" and (path / "recipe.yaml").exists():  # a run folder damaged elsewhere than its checkpoint
        if not (path / "last.safetensors").exists():
            (path / "last.safetensors").write_bytes(ctx.ckpt.read_bytes())
    before = snapshot(tmp_path, ctx.root)
    result = invoke(argv(tmp_path, path, ctx))
    line = assert_one_line(result, 2)
    culprit = needle if needle is not None else path.name
    assert shown(culprit) in line, (culprit, line)
    after = snapshot(tmp_path, ctx.root)
    assert {k: v for k, v in after.items() if k in before} == before, "a pre-existing file changed"
    assert temp_files(tmp_path, ctx.root) == []


def test_the_corpus_holds_at_least_100_hostile_inputs_and_every_command():
    assert len(CASES) >= 100
    listed = {row[0] for row in COMMANDS} | {row[0] for row in OUTPUTS}
    for top in ("train", "distill", "eval", "export", "predict", "compare", "analyze-conflict", "recipes", "data", "fetch"):
        assert any(c.split()[0] == top for c in listed), top


# ---------------------------------------------------------------------------------- outputs
# (command, argv from (tmp, the output path, ctx) [, bad outputs it rightly accepts]): each must
# refuse to replace an existing file without --force, and a folder or a path through a file
OUTPUTS = [
    ("data export-coco", lambda t, o, c: ["data", "export-coco", c.coco, o]),
    ("export --out", lambda t, o, c: ["export", c.ckpt, "--format", "safetensors", "--out", o, "--runs", "0", "--no-verify",
                                      "--input-size", "160", "160"]),
    ("eval --save-predictions", lambda t, o, c: ["eval", c.ckpt, "--data", c.recipe, "--device", "cpu", "--save-predictions", o]),
    ("eval --json", lambda t, o, c: ["eval", "--data", c.coco, "--predictions", c.preds, "--split", "all", "--json", o]),
    ("analyze-conflict --json", lambda t, o, c: ["analyze-conflict", "--teacher", c.ckpt, "--student", c.recipe,
                                                "--max-images", "1", "--device", "cpu", "--json", o]),
    ("compare --plot", lambda t, o, c: ["compare", c.root / "run", "--plot", o]),
    ("predict --out", lambda t, o, c: ["predict", c.ckpt, c.image, "--out", o, "--device", "cpu", "--input-size", "160", "160"],
     {"a folder"}),  # an empty folder is a new --out
]


def _existing(t: Path) -> Path:
    (t / "keep.png").write_text("precious\n")
    return t / "keep.png"


def _markup_existing(t: Path) -> Path:
    (t / "[red]keep[i].png").write_text("precious\n")
    return t / "[red]keep[i].png"


def _folder(t: Path) -> Path:
    (t / "adir.png").mkdir()
    return t / "adir.png"


def _through_file(t: Path) -> Path:
    (t / "afile").write_text("x")
    return t / "afile" / "o.png"


BAD_OUTPUTS = {"an existing file": _existing, "an existing file with markup in its name": _markup_existing,
               "a folder": _folder, "a path through a file": _through_file}


@pytest.mark.parametrize("cmd, argv, kind", [pytest.param(row[0], row[1], kind, id=f"{row[0]}: {kind}")
                                             for row in OUTPUTS for kind in BAD_OUTPUTS
                                             if kind not in (row[2] if len(row) > 2 else ())])
def test_an_output_that_would_replace_a_file_or_cannot_be_written_is_refused(tmp_path, ctx, cmd, argv, kind):
    out = BAD_OUTPUTS[kind](tmp_path)
    before = snapshot(tmp_path, ctx.root)
    result = invoke(argv(tmp_path, out, ctx))
    culprit = out.parent if kind == "a path through a file" else out
    assert_one_line(result, 2, culprit.name if kind != "a path through a file" else "afile")
    assert snapshot(tmp_path, ctx.root) == before  # not even a new file
    assert temp_files(tmp_path) == []


def test_a_full_disk_names_the_file_and_says_disk_full_and_leaves_no_temporary_file(tmp_path, ctx, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    result = invoke(["data", "export-coco", ctx.coco, tmp_path / "gt.json"])
    assert_one_line(result, 2, str(tmp_path / "gt.json"), "disk full")
    assert list(tmp_path.iterdir()) == []


def test_a_file_size_limit_during_a_checkpoint_save_is_one_line_and_no_litter(tmp_path, ctx):
    """RLIMIT_FSIZE (with SIGXFSZ ignored, so writes fail with EFBIG): the checkpoint save of a
    tiny run fails in torch.save; the line names the file and what the OS said."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kdctl", "train", ctx.recipe, "--out", out, "--max-steps", "1"],
                          capture_output=True, text=True, env=env(), preexec_fn=limit, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and "last." in lines[0] and "File too large" in lines[0], proc.stderr[-2000:]
    assert temp_files(out) == []
    assert not (out / "last.safetensors").exists()


# ---------------------------------------------------------------------------------- run folders
@pytest.mark.parametrize("left", [("best.safetensors", "best.state.pt", "recipe.yaml", "metrics.jsonl"),
                                  (".kdctl-run",), ("metrics.jsonl",), ("tb/events",), ("step_000010.safetensors",)])
def test_a_folder_holding_part_of_another_run_is_never_reused(tmp_path, ctx, left):
    run = tmp_path / "run"
    for name in left:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(f"the other run's {name}\n")
    before = snapshot(tmp_path)
    result = invoke(["train", ctx.recipe, "--out", run, "--max-steps", "1"])
    assert_one_line(result, 2, str(run), "--resume", "--overwrite")
    assert snapshot(tmp_path) == before


def test_overwrite_deletes_the_previous_runs_files_and_nothing_else(tmp_path, ctx):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.safetensors", "recipe.yaml", "metrics.jsonl", "step_000004.state.pt"):
        (run / name).write_text("old\n")
    (run / "tb").mkdir()
    (run / "tb" / "events").write_text("old\n")
    (run / "notes.txt").write_text("mine\n")
    result = invoke(["train", ctx.recipe, "--out", run, "--max-steps", "1", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "deleted the previous run's" in result.stderr and "best.safetensors" in result.stderr
    assert (run / "notes.txt").read_text() == "mine\n"
    assert not (run / "step_000004.state.pt").exists()
    assert all(json.loads(line)["step"] <= 1 for line in (run / "metrics.jsonl").read_text().splitlines())
    assert (run / ".kdctl-run").is_file() and (run / "last.safetensors").is_file()
    # ... and the run it made is itself protected now
    assert_one_line(invoke(["train", ctx.recipe, "--out", run, "--max-steps", "1"]), 2, "already holds a run")


def test_resume_and_overwrite_together_are_refused(tmp_path, ctx):
    assert_one_line(invoke(["train", ctx.recipe, "--out", tmp_path, "--resume", "--overwrite"]), 2, "--resume", "--overwrite")


def test_export_coco_never_replaces_images_without_force(tmp_path, ctx):
    data = ["data", "export-coco", ctx.recipe, tmp_path / "shapes.json", "--split", "val"]
    assert invoke(data).exit_code == 0
    images = sorted((tmp_path / "shapes").iterdir())
    assert len(images) == 4
    (tmp_path / "shapes.json").unlink()
    images[0].write_bytes(b"my own picture")
    before = snapshot(tmp_path)
    assert_one_line(invoke(data), 2, images[0].name, "--force")
    assert snapshot(tmp_path) == before
    assert invoke([*data, "--force"]).exit_code == 0
    assert images[0].read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------- temporary files
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_of_dead_processes_are_removed_and_counted_on_resume(tmp_path, ctx):
    from kdctl.artifact import rundir

    run = tmp_path / "run"
    assert invoke(["train", ctx.recipe, "--out", run, "--max-steps", "1"]).exit_code == 0
    host = rundir._HOST
    stale = [run / f".last.safetensors.{dead_pid()}-{host}-0123abcd.tmp", run / ".last.state.pt.89abcdef.tmp"]
    live = run / f".best.safetensors.{os.getpid()}-{host}-0123abcd.tmp"
    other_host = run / f".best.state.pt.{dead_pid()}-{'0' * 6 if host != '0' * 6 else '1' * 6}-0123abcd.tmp"
    for p in (*stale, live, other_host):
        p.write_bytes(b"x" * 1000)
    with open(run / "metrics.jsonl", "ab") as log:  # a damaged metrics log does not stop a resume either
        log.write("caf\xe9\n".encode("latin-1") + b"[" * 100000 + b"\n")
    rundir._cleaned.clear()
    result = invoke(["train", ctx.recipe, "--out", run, "--max-steps", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "removed 2 stale temporary files" in result.stderr
    assert not any(p.exists() for p in stale)
    assert live.exists() and other_host.exists()  # a live process's, and one this host cannot judge


def test_an_error_inside_an_atomic_write_removes_its_temporary_file(tmp_path):
    from kdctl.artifact.rundir import atomic_path
    from kdctl.errors import Terminated

    (tmp_path / "f").write_text("old")
    for exc in (ValueError("boom"), KeyboardInterrupt(), Terminated(signal.SIGTERM)):
        with pytest.raises(type(exc)):
            with atomic_path(tmp_path / "f") as tmp:
                tmp.write_text("half")
                raise exc
    assert [p.name for p in tmp_path.iterdir()] == ["f"] and (tmp_path / "f").read_text() == "old"


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        e.pop(k, None)
    return e


def wait_until(proc, ready, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if ready():
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def test_sigterm_during_training_saves_last_and_exits_143(tmp_path, ctx):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "kdctl", "train", ctx.recipe, "--out", str(out),
                             "--set", "train.epochs=50", "--set", "train.eval_every=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    log = out / "metrics.jsonl"
    wait_until(proc, lambda: log.is_file() and '"kind": "train"' in log.read_text())
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout and "resume with: kdctl" in stdout
    assert (out / "last.safetensors").is_file() and temp_files(out) == []


def test_sigterm_during_export_coco_leaves_no_temporary_file_and_exits_143(tmp_path, ctx):
    recipe = tmp_path / "many.yaml"
    recipe.write_text(tiny_recipe_text(**{"data.shapes.val_images": "1000", "data.shapes.image_size": "128"}))
    proc = subprocess.Popen([sys.executable, "-m", "kdctl", "data", "export-coco", str(recipe), str(tmp_path / "o.json"),
                             "--split", "val"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    wait_until(proc, lambda: (tmp_path / "o").is_dir() and len(os.listdir(tmp_path / "o")) > 5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "writing" not in ln]
    assert proc.returncode == 143, stderr[-2000:]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], stderr[-2000:]
    assert temp_files(tmp_path) == [] and not (tmp_path / "o.json").exists()


# ---------------------------------------------------------------------------------- the one error path
def test_an_error_inside_a_data_loader_worker_is_one_line_naming_the_image(tmp_path, ctx):
    """A JPEG whose header reads but whose data is cut: the decode fails in a worker process."""
    from PIL import Image

    img = Image.effect_noise((64, 64), 60).convert("RGB")
    img.save(tmp_path / "a.jpg", quality=95)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 3])
    gt = hostile._coco(tmp_path, images=[{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
                       categories=[{"id": i + 1, "name": f"c{i}"} for i in range(4)])
    result = invoke(["eval", ctx.ckpt, "--data", gt, "--device", "cpu"])
    assert_one_line(result, 2, "a.jpg", "data-loader worker")


def test_a_bug_exits_1_and_says_how_to_report_it_and_debug_shows_the_traceback(monkeypatch):
    import kdctl.recipe

    def broken(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(kdctl.recipe, "load_recipe", broken)
    line = assert_one_line(invoke(["recipes", "validate", "shapes"]), 1, "ZeroDivisionError", "bug", "--debug")
    assert line.startswith("error: internal error")
    debug = invoke(["--debug", "recipes", "validate", "shapes"])
    assert isinstance(debug.exception, ZeroDivisionError)


def test_user_strings_in_normal_output_are_never_markup(tmp_path, ctx):
    out = tmp_path / "[red]x[/].json"
    result = invoke(["data", "export-coco", ctx.coco, out])
    assert result.exit_code == 0, result.output
    assert "[red]x[/].json" in result.stdout


def test_unknown_device_is_one_line():
    assert_one_line(invoke(["eval", "nowhere.safetensors", "--device", "tpu"]), 2, "'tpu'")


def test_a_full_disk_during_an_onnx_export_says_disk_full_not_opset(tmp_path, ctx, monkeypatch):
    import torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch.onnx, "export", full)
    out = tmp_path / "m.onnx"
    result = invoke(["export", ctx.ckpt, "--format", "onnx", "--out", out, "--input-size", "160", "160", "--runs", "0"])
    line = assert_one_line(result, 2, str(out), "disk full")
    assert "opset" not in line
    assert list(tmp_path.iterdir()) == []


def test_an_empty_dataset_is_one_line_before_anything_starts(tmp_path, ctx):
    empty = hostile._coco(tmp_path, "empty.json", images=[], annotations=[])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {ctx.recipe}\ndata: {{format: coco, path: {empty}, val_path: {empty}}}\n")
    assert_one_line(invoke(["train", recipe, "--out", tmp_path / "run"]), 2, str(empty), "no images")
    assert not (tmp_path / "run").exists()
    assert_one_line(invoke(["eval", ctx.ckpt, "--data", empty, "--device", "cpu"]), 2, str(empty), "no images")


def test_a_torchrun_restart_of_the_same_job_may_start_afresh_in_its_own_folder(tmp_path, monkeypatch):
    """--max-restarts after a failure before the first checkpoint: the folder that job marked is
    its own (same TORCHELASTIC_RUN_ID); another job's folder stays refused."""
    from kdctl.artifact import rundir
    from kdctl.errors import KdctlError

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    rundir.claim_run_dir(tmp_path, overwrite=False, command="student")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert rundir.claim_run_dir(tmp_path, overwrite=False, command="student") == [".kdctl-run", "metrics.jsonl"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    with pytest.raises(KdctlError, match="already holds a run"):
        rundir.claim_run_dir(tmp_path, overwrite=False, command="student")


@pytest.mark.parametrize("exc, code, needles", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/x.onnx"), 2, ("/data/x.onnx", "disk full")),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/f"), 2, ("/ro/f", "Permission denied", "permissions")),
    (UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"), 2, ("not UTF-8",)),
    (RecursionError("maximum recursion depth exceeded"), 2, ("nested too deeply",)),
    (MemoryError(), 2, ("out of memory",)),
    (json.JSONDecodeError("Expecting value", "x", 0), 2, ("invalid JSON",)),
    (RuntimeError("DataLoader worker (pid(s) 12) is killed by signal: Terminated. "), 143, ("SIGTERM",)),
    (RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed. "), 2, ("data.num_workers",)),
    (RuntimeError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  "  File x\nOSError: /d/a.jpg: broken data"), 2, ("/d/a.jpg: broken data", "data-loader worker")),
    (RuntimeError("Caught IndexError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                  "IndexError: list index out of range"), 1, ("IndexError", "bug")),
    (KeyboardInterrupt(), 130, ("SIGINT",)),
    (KeyError("x"), 1, ("KeyError", "bug")),
])
def test_every_exception_maps_to_one_code_and_line(exc, code, needles):
    from kdctl.cli.common import describe

    got, line = describe(exc)
    assert got == code and "\n" not in line, (got, line)
    for needle in needles:
        assert needle in line, (needle, line)


USAGE = ["train", "distill", "eval", "export", "predict", "compare", "fetch", "analyze-conflict", "recipes validate",
         "recipes show", "data stats", "data export-coco"]


@pytest.mark.parametrize("cmd", USAGE)
def test_an_unknown_option_is_one_line_naming_it_and_the_help(cmd):
    result = invoke([*cmd.split(), "x", "--no-such-[red]option"])
    assert_one_line(result, 2, "--no-such-[red]option", f"kdctl {cmd} --help")


@pytest.mark.parametrize("argv, needle", [(["eval", "x", "--batch-size", "0"], "--batch-size"),
                                          (["export", "x", "--input-size", "a", "b"], "--input-size"),
                                          (["train", "shapes", "--max-steps", "-1"], "--max-steps"),
                                          (["data", "export-coco", "shapes"], "OUT")])
def test_a_bad_option_value_or_a_missing_argument_is_one_line(argv, needle):
    assert_one_line(invoke(argv), 2, needle)
