"""The failure classes of the second reliability round, one test (or one parametrised family) a
class, each over every command or reader of the class:

1. an image that fails to decode mid-run with ``data.skip_bad`` / ``--skip-bad`` is skipped,
   left out of the score and named in the summary, by train, eval (checkpoint and ONNX) and
   analyze-conflict alike (predict skips by default: tests/test_predict.py);
2. a dataset file that lacks a required key is read as a dataset, and the line names the key;
3. a damaged training state is one line naming the file, exit 2 (the run-folder corpus of
   tests/hostile has the damaged states; here the restore path itself);
4. every reader of ``metrics.jsonl`` skips malformed lines, counts them and says so;
5. Ctrl-C stops every long-running command with exit 130 and no output or temporary file, even
   when the shell started it with SIGINT ignored (a background job of a script);
and kdctl's own sources compile without a warning.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT
from test_safety import assert_one_line, ctx, env, invoke, temp_files, tiny_recipe_text  # noqa: F401 (ctx: fixture)

import hostile


# ---------------------------------------------------------------------------------- 1. skip_bad
def _coco_with_a_truncated_jpeg(root: Path, n: int = 6) -> Path:
    """COCO ground truth of ``n`` 96-px photos-like images, the third cut to a third of its bytes
    (its header reads, so the dataset builds; the pixels fail when decoded)."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        Image.effect_noise((96, 96), 60).convert("RGB").save(root / "img" / f"{i}.jpg", quality=95)
        images.append({"id": i + 1, "file_name": f"img/{i}.jpg", "width": 96, "height": 96})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 4, "bbox": [10, 10, 40, 40], "iscrowd": 0})
    data = (root / "img" / "2.jpg").read_bytes()
    (root / "img" / "2.jpg").write_bytes(data[: len(data) // 3])
    gt = root / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns,
                              "categories": [{"id": i + 1, "name": f"c{i}"} for i in range(4)]}))
    return gt


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, ctx):  # noqa: F811
    root = tmp_path_factory.mktemp("damaged")
    gt = _coco_with_a_truncated_jpeg(root)
    recipe = root / "bad.yaml"
    recipe.write_text(tiny_recipe_text(**{"data.format": "coco", "data.path": str(gt), "data.val_path": str(gt),
                                          "data.skip_bad": "true", "data.batch_size": "2", "data.short_side": "96",
                                          "data.max_side": "96"}))
    return root, gt, recipe


@pytest.mark.parametrize("workers, mosaic", [(0, 0.0), (2, 1.0)], ids=["in-process", "workers+mosaic"])
def test_training_skips_an_image_that_fails_to_decode_and_names_it(tmp_path, damaged, workers, mosaic):
    root, gt, recipe = damaged
    result = invoke(["train", recipe, "--out", tmp_path / "run", "--json", "--set", f"data.num_workers={workers}",
                     "--set", f"data.augment.mosaic={mosaic}"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [u["file"] for u in summary["unreadable"]] == [str(root / "img" / "2.jpg")]
    assert "cannot decode image" in summary["unreadable"][0]["reason"]
    evals = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" for r in evals)


def test_without_skip_bad_the_undecodable_image_still_stops_every_command(tmp_path, damaged, ctx):  # noqa: F811
    root, gt, recipe = damaged
    for argv in (["eval", ctx.ckpt, "--data", gt, "--device", "cpu"],
                 ["analyze-conflict", "--teacher", ctx.ckpt, "--student", ctx.recipe, "--data", gt, "--device", "cpu"]):
        assert_one_line(invoke(argv), 2, "2.jpg", "skip_bad")


def _eval_cmd(t, gt, ctx):
    return ["eval", ctx.ckpt, "--data", gt, "--device", "cpu", "--skip-bad", "--json", "-"]


def _eval_onnx_cmd(t, gt, ctx):
    res = invoke(["export", ctx.ckpt, "--format", "onnx", "--out", t / "m.onnx", "--runs", "0", "--input-size", "160", "160"])
    assert res.exit_code == 0, res.output
    return ["eval", t / "m.onnx", "--data", gt, "--skip-bad", "--json", "-"]


def _analyze_cmd(t, gt, ctx):
    return ["analyze-conflict", "--teacher", ctx.ckpt, "--student", ctx.recipe, "--data", gt, "--device", "cpu",
            "--skip-bad", "--json", "-"]


@pytest.mark.parametrize("make", [_eval_cmd, _eval_onnx_cmd, _analyze_cmd], ids=["eval", "eval MODEL.onnx", "analyze-conflict"])
def test_skip_bad_leaves_the_undecodable_image_out_of_the_result_and_names_it(tmp_path, damaged, ctx, make):  # noqa: F811
    root, gt, recipe = damaged
    result = invoke(make(tmp_path, gt, ctx))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    unreadable = report["unreadable"] if "unreadable" in report else report["data"]["unreadable"]
    assert [u["file"] for u in unreadable] == [str(root / "img" / "2.jpg")]
    images = report["num_images"] if "num_images" in report else report["data"]["images"]
    assert images == 5  # scored (or measured) without it, as an image skipped when the dataset was read


def test_a_batch_of_only_unreadable_images_is_empty_not_an_error():
    from kdctl.data.collate import collate

    batch = collate([{"unreadable": [("a.jpg", "cannot decode")], "image_id": 3}])
    assert len(batch) == 0 and batch.unreadable == (("a.jpg", "cannot decode", 3),)
    assert batch.to("cpu").unreadable == batch.unreadable


# ---------------------------------------------------------------------------------- 2. dataset files
YAML_LACKING = {"names": "path: .\ntrain: images\nval: images\n", "val": "path: .\ntrain: images\nnames: [a]\n"}


@pytest.mark.parametrize("key", YAML_LACKING)
@pytest.mark.parametrize("cmd", ["data stats", "eval --data", "analyze-conflict --data", "train DATA.yaml"])
def test_a_dataset_file_lacking_a_key_is_read_as_a_dataset_and_the_line_names_the_key(tmp_path, ctx, cmd, key):  # noqa: F811
    data_yaml = hostile._yolo(tmp_path, YAML_LACKING[key])
    argv = {"data stats": ["data", "stats", data_yaml, "--split", "val"],
            "eval --data": ["eval", ctx.ckpt, "--data", data_yaml, "--device", "cpu"],
            "analyze-conflict --data": ["analyze-conflict", "--teacher", ctx.ckpt, "--student", ctx.recipe, "--data",
                                        data_yaml, "--device", "cpu"],
            "train DATA.yaml": ["train", data_yaml, "--dry-run", "--out", tmp_path / "out"]}[cmd]
    line = assert_one_line(invoke(argv), 2, "data.yaml")
    if cmd == "train DATA.yaml":  # given where a recipe belongs: says what it is and where it goes
        assert "YOLO dataset description" in line and "--data" in line, line
    else:
        assert f"'{key}'" in line and "missing" in line, line
        assert "expected a valid dictionary" not in line


# ---------------------------------------------------------------------------------- 3. training states
def _state(ctx, **change):  # noqa: F811
    import torch

    state = torch.load(ctx.root / "run" / "last.state.pt", weights_only=True)
    for key, value in change.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize("change", [
    {"optimizer": None}, {"rng": None}, {"history": "x"}, {"step": 1.5},
    {"optimizer": {"state": {}, "param_groups": []}},  # another model's optimizer
    {"scheduler": {"nothing": 1}}, {"rng": {"python": 1}},
], ids=["no optimizer", "no rng", "history a string", "step a float", "another optimizer", "scheduler empty", "rng garbage"])
def test_a_damaged_training_state_is_one_line_naming_it_exit_2_and_changes_nothing(tmp_path, ctx, change):  # noqa: F811
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(ctx.root / "run", run)
    torch.save(_state(ctx, **change), run / "last.state.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert_one_line(invoke(["train", ctx.recipe, "--resume", "--out", run]), 2, "last.state.pt", "damaged")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------------------------- 4. metrics.jsonl
GARBAGE = ['{"step": "x", "epoch": [1], "kind": "eval", "AP": 0.99}',  # AP beside garbage fields
           '{"step": 9, "epoch": 0, "kind": "eval", "AP": "0.98"}',    # AP a string
           '{"step": 9, "epoch": 0, "kind": "eval", "AP": 7.0}',       # AP outside COCO's range
           '{"step": 9, "epoch": 0, "kind": "train", "loss": [1]}', "[1, 2]", '{"step": 3, "ep']


def _run_with_garbage(tmp_path, ctx):  # noqa: F811
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ctx.root / "run", run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write("\n".join(GARBAGE) + "\n")
    return run


def test_compare_skips_and_counts_malformed_metrics_lines_and_says_so(tmp_path, ctx):  # noqa: F811
    run = _run_with_garbage(tmp_path, ctx)
    result = invoke(["compare", run])
    assert result.exit_code == 0, result.output
    assert f"skipped {len(GARBAGE)} malformed lines" in result.stderr and "metrics.jsonl" in result.stderr
    assert "99.0" not in result.stdout and "98.0" not in result.stdout and "700.0" not in result.stdout
    rows = json.loads(invoke(["compare", run, "--json"]).stdout)
    assert rows[0]["malformed_lines"] == len(GARBAGE) and rows[0]["best"]["AP"] <= 1
    plotted = invoke(["compare", run, "--plot", tmp_path / "c.png"])
    assert plotted.exit_code == 0 and (tmp_path / "c.png").stat().st_size > 0


def test_resume_drops_malformed_metrics_lines_and_says_so(tmp_path, ctx):  # noqa: F811
    run = _run_with_garbage(tmp_path, ctx)
    result = invoke(["train", ctx.recipe, "--resume", "--out", run, "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    assert f"dropped {len(GARBAGE)} malformed lines" in result.output
    from kdctl.engine.metrics import read_records

    records, malformed = read_records(run / "metrics.jsonl")
    assert malformed == 0 and max(r["step"] for r in records) == 4


def test_parse_record_keeps_what_the_log_writes(tmp_path):
    from kdctl.engine.metrics import MetricsLog, read_records

    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.record("plan", 0, {"detector": {"family": "gfl"}, "data": ["anything"]})
        log.log("train", 1, 0, {"loss": float("nan"), "lr": 0.01})
        log.log("eval", 1, 0, {"AP": 0.5, "APm": -1.0})
    records, malformed = read_records(tmp_path / "metrics.jsonl")
    assert malformed == 0 and [r["kind"] for r in records] == ["plan", "train", "eval"]


# ---------------------------------------------------------------------------------- 5. Ctrl-C
def _sigint_caught(pid: int) -> bool:
    """Whether process ``pid`` runs kdctl and has a handler for SIGINT (Linux: the SigCgt mask of
    /proc; right after the fork the child still has its parent's handlers, hence the command line)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        if b"kdctl" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
    except OSError:
        return False
    mask = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(mask >> (signal.SIGINT - 1) & 1)


class _Trickle:
    """An HTTP server on 127.0.0.1 that sends a 50 MB body 64 KiB every 50 ms (a download that
    is still running when Ctrl-C comes)."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(50 << 20))
                self.end_headers()
                try:
                    for _ in range(800):
                        self.wfile.write(b"\0" * 65536)
                        time.sleep(0.05)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.pth"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


LONG = {  # (argv, the outputs that must not exist afterwards) for (tmp, ctx, many-images recipe, url)
    "export": lambda t, c, many, url: (["export", c.ckpt, "--format", "onnx", "--out", t / "o.onnx", "--runs", "100000",
                                        "--input-size", "160", "160"], [t / "o.onnx"]),
    "eval": lambda t, c, many, url: (["eval", c.ckpt, "--data", many, "--device", "cpu", "--save-predictions",
                                      t / "p.json"], [t / "p.json"]),
    "predict": lambda t, c, many, url: (["predict", c.ckpt, "--data", many, "--out", t / "pred", "--device", "cpu"],
                                        [t / "pred"]),
    "analyze-conflict": lambda t, c, many, url: (["analyze-conflict", "--teacher", c.ckpt, "--student", many,
                                                  "--device", "cpu", "--json", t / "a.json"], [t / "a.json"]),
    "data export-coco": lambda t, c, many, url: (["data", "export-coco", many, t / "o.json", "--split", "val"],
                                                 [t / "o.json"]),
    "fetch": lambda t, c, many, url: (["fetch", url, "--sha256", "0123456789abcdef", "--as", "retinanet_resnet50_fpn"],
                                      [t / "home" / "teachers", t / "home" / "downloads" / "model.pth"]),
}



def test_a_stop_signal_inside_an_import_waits_for_the_import_to_finish(tmp_path):
    """Ctrl-C while a module is being imported is held until the import is done, then raises:
    the module is never left half initialised (an interrupted extension module can crash the
    interpreter), and the command still stops at once after it."""
    (tmp_path / "slowmod.py").write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(tmp_path / 'started')!r}).write_text('1')\n"
        "time.sleep(1.5)  # a slow import: the signal lands here\n"
        f"pathlib.Path({str(tmp_path / 'imported')!r}).write_text('1')\n")
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from kdctl.cli.common import stop_signals_raise\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    with stop_signals_raise():\n"
        "        import slowmod\n"
        "        time.sleep(20)\n"
        "except KeyboardInterrupt:\n"
        "    print(f'interrupted after {time.monotonic() - start:.2f} s')\n"
        "    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    end = time.time() + 60
    while not (tmp_path / "started").exists() and proc.poll() is None and time.time() < end:
        time.sleep(0.02)
    time.sleep(0.3)  # inside the import's sleep
    assert not (tmp_path / "imported").exists(), "the import ended before the signal"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert (tmp_path / "imported").exists(), "the import was cut short"
    took = float(out.split()[2])
    assert took < 10, out  # it stopped after the import, not after the 20 s that follow


@pytest.mark.parametrize("cmd", LONG)
def test_ctrl_c_stops_a_long_command_started_with_sigint_ignored_exit_130_nothing_left(tmp_path, ctx, cmd):  # noqa: F811
    many = tmp_path / "many.yaml"
    many.write_text(tiny_recipe_text(**{"data.shapes.val_images": "3000", "data.shapes.image_size": "128"}))
    server = _Trickle() if cmd == "fetch" else None
    try:
        argv, outputs = LONG[cmd](tmp_path, ctx, many, server.url if server else "")
        e = {**env(), "KDCTL_HOME": str(tmp_path / "home")}
        proc = subprocess.Popen([sys.executable, "-m", "kdctl", *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=e, cwd=tmp_path,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as `cmd &` in a script
        end = time.time() + 120
        while not _sigint_caught(proc.pid) and proc.poll() is None and time.time() < end:
            time.sleep(0.05)
        time.sleep(3.0)  # into the work (the command's imports done)
        assert proc.poll() is None, f"ended before Ctrl-C: {proc.returncode} {proc.stderr.read()[-1500:]}"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if server is not None:
            server.httpd.shutdown()
    # 130, or killed by SIGINT when the signal landed inside an import that runs code through
    # CPython's PyRun_* (torch's): Python then re-raises it at exit, which a shell reports as 130 too
    assert proc.returncode in (130, -signal.SIGINT), stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "interrupted (SIGINT)" in lines[0], stderr[-2000:]
    assert [str(p) for p in outputs if p.exists()] == [] and temp_files(tmp_path) == []


# ---------------------------------------------------------------------------------- warnings
def test_kdctls_sources_compile_without_a_warning():
    """An invalid escape in a docstring warns only when a file is compiled, not from a cached
    .pyc: compile every source with warnings as errors (the suite runs kdctl's own warnings as
    errors too: pyproject.toml)."""
    files = sorted((ROOT / "kdctl").rglob("*.py"))
    assert len(files) > 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in files:
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
