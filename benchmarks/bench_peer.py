"""kdctl's real-time students beside the most used public trainer (Ultralytics), on one protocol.

    python benchmarks/bench_peer.py shapes --seeds 0,1,2 --out /work/bench-out/peer
    python benchmarks/bench_peer.py raccoon --seeds 0,1 --out /work/bench-out/peer-raccoon

One command from a fresh clone (after ``make install``):

1. the peer's own virtual environment (``--peer-venv``, default ``benchmarks/.peer-venv``, git
   ignored): Ultralytics (:data:`PEER_VERSION`) from PyPI, with kdctl's torch shared through a
   ``.pth`` file instead of a second download. Ultralytics is AGPL: it runs there as a black box
   (``benchmarks/peer_ultralytics.py``), never as a kdctl dependency;
2. the protocol's data exported once with ``kdctl data export-coco`` (COCO JSON, which the peer
   driver turns into a YOLO dataset);
3. every model trained with the protocol's settings (:data:`PROTOCOLS`: the same images, input
   size, batch, epochs, AdamW lr, cosine schedule, warm-up, hflip 0.5 and no other
   augmentation), ``--jobs`` runs at a time with ``--threads`` torch threads each;
4. every model, kdctl's and the peer's, predicts the validation images at score 0.001 with at
   most 100 detections per image (NMS IoU 0.7: the yolo family's and Ultralytics'), and every
   predictions file is scored by the same ``kdctl eval --data VAL.json --predictions`` (pycocotools);
5. the table: AP / AP50 / AP75 mean ± sample std over the seeds, parameters, and seconds per
   training step of the table's runs (``--jobs`` at a time: a loaded machine); then
   ``--step-rounds`` rounds of short runs of kdctl-n and yolov8n one at a time, alternating
   (:func:`step_times`), for the step-time ratio; written to ``--out``/table.md and table.json.

Models (``--models``): ``kdctl-n`` / ``kdctl-s`` (the recipe's student / teacher trained alone),
``kdctl-crosskd`` (the student distilled from the seed-0 ``kdctl-s`` with CrossKD),
``yolov8n`` / ``yolov8s`` / ``yolo11n`` / ``yolo26n`` (the peer's yaml, from scratch) and
``yolov8n-distill`` (the peer's ``distill_model=`` from the seed-0 ``yolov8s``). A finished run
is kept, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_VERSION = "8.4.190"

# the protocols: kdctl recipe + --set overrides, and the matching numbers for the peer driver
PROTOCOLS = {
    "shapes": dict(recipe="demo-yolo", sets=[], imgsz=128, epochs=10, teacher_epochs=16, warmup=50, batch=16),
    # real photos, 1 class, 160 train / 40 test at 320 px (longest side; the peer letterboxes to 320)
    "raccoon": dict(recipe="demo-yolo", imgsz=320, epochs=30, teacher_epochs=40, warmup=50, batch=16,
                    sets=["data.format=voc", "data.path=../shared/data/raccoon-voc", "data.train_split=train",
                          "data.val_split=test", "data.short_side=320", "data.max_side=320"]),
}
KDCTL = ("kdctl-n", "kdctl-s", "kdctl-crosskd")
PEER = ("yolov8n", "yolov8s", "yolo11n", "yolo26n", "yolov8n-distill")
TEACHER_OF = {"kdctl-crosskd": "kdctl-s", "yolov8n-distill": "yolov8s"}


def sh(cmd: list[str], log: Path, env: dict | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
    if rc:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}; see {log}")


def peer_python(venv: Path) -> Path:
    """The peer venv's python, created on first use (Ultralytics + kdctl's torch via a .pth)."""
    python = venv / "bin" / "python"
    stamp = venv / f".ultralytics-{PEER_VERSION}"
    if stamp.exists():
        return python
    subprocess.check_call([sys.executable, "-m", "venv", str(venv)])  # a venv of the same base Python
    import site

    own = [p for p in site.getsitepackages() if p.endswith("site-packages")][0]
    target = subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"], text=True)
    Path(target.strip(), "kdctl-torch.pth").write_text(own + "\n")  # torch, torchvision, onnx: kdctl's copies
    subprocess.check_call([str(python), "-m", "pip", "install", "--quiet", f"ultralytics=={PEER_VERSION}"])
    stamp.touch()
    return python


def peer_env(out: Path, threads: int = 1) -> dict:
    """Offline Ultralytics with its own settings folder, and a local TTF as the font it checks for."""
    cfg = out / "peer-config"
    (cfg / "Ultralytics").mkdir(parents=True, exist_ok=True)
    font = cfg / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        import matplotlib

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        font.write_bytes(src.read_bytes())
    return {"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(cfg), "OMP_NUM_THREADS": str(threads)}


def export_data(proto: dict, out: Path) -> tuple[Path, Path]:
    kdctl = Path(sys.executable).parent / "kdctl"
    paths = []
    for split in ("train", "val"):
        path = out / "data" / f"{split}.json"
        if not path.exists():
            data = _data_arg(proto) if proto["sets"] else proto["recipe"]
            sh([str(kdctl), "data", "export-coco", data, str(path), "--split", split, "--force"], out / "logs" / f"data-{split}.log")
        paths.append(path)
    return paths[0], paths[1]


def _data_arg(proto: dict) -> str:
    """The dataset a protocol's --set overrides name (export-coco takes a dataset, not overrides)."""
    sets = dict(s.split("=", 1) for s in proto["sets"])
    return sets["data.path"]


def kdctl_run(model: str, seed: int, proto: dict, out: Path, threads: int) -> Path:
    kdctl = Path(sys.executable).parent / "kdctl"
    run = out / "runs" / f"{model}-s{seed}"
    preds = run / "val-predictions.json"
    if preds.exists():
        return preds
    sets = [*proto["sets"], f"train.seed={seed}", f"runtime.threads={threads}", "eval.score_thr=0.001",
            f"train.epochs={proto['teacher_epochs'] if model == 'kdctl-s' else proto['epochs']}",
            f"train.warmup_iters={proto['warmup']}", f"data.batch_size={proto['batch']}"]
    args = [a for s in sets for a in ("--set", s)]
    if model == "kdctl-n":
        cmd = [str(kdctl), "train", proto["recipe"], *args]
    elif model == "kdctl-s":
        cmd = [str(kdctl), "train", proto["recipe"], "--model", "teacher", *args]
    else:
        teacher = out / "runs" / f"{TEACHER_OF[model]}-s0" / "last.safetensors"
        cmd = [str(kdctl), "distill", proto["recipe"], "--teacher", str(teacher), "--method", "crosskd", *args]
    env = {"OMP_NUM_THREADS": str(threads)}
    sh([*cmd, "--out", str(run), "--overwrite"], out / "logs" / f"{model}-s{seed}.log", env)
    sh([str(kdctl), "eval", str(run / "last.safetensors"), "--save-predictions", str(preds)],
       out / "logs" / f"{model}-s{seed}-eval.log", env)
    return preds


def peer_run(model: str, seed: int, proto: dict, out: Path, threads: int, python: Path, data: tuple[Path, Path]) -> Path:
    work = out / "runs" / f"{model}-s{seed}"
    preds = work / "val-predictions.json"
    if preds.exists():
        return preds
    arch = "yolov8n" if model == "yolov8n-distill" else model
    epochs = proto["teacher_epochs"] if model == "yolov8s" else proto["epochs"]
    cmd = [str(python), str(ROOT / "benchmarks" / "peer_ultralytics.py"), "--train", str(data[0]), "--val", str(data[1]),
           "--model", f"{arch}.yaml", "--epochs", str(epochs), "--imgsz", str(proto["imgsz"]), "--batch", str(proto["batch"]),
           "--seed", str(seed), "--warmup-steps", str(proto["warmup"]), "--threads", str(threads),
           "--work", str(work), "--out", str(preds)]
    if model in TEACHER_OF:
        cmd += ["--distill-from", str(out / "runs" / f"{TEACHER_OF[model]}-s0" / "train" / "weights" / "last.pt")]
    sh(cmd, out / "logs" / f"{model}-s{seed}.log", peer_env(out, threads))
    return preds


def score(preds: Path, val: Path, out: Path) -> dict:
    kdctl = Path(sys.executable).parent / "kdctl"
    result = preds.with_suffix(".metrics.json")
    if not result.exists():
        sh([str(kdctl), "eval", "--data", str(val), "--predictions", str(preds), "--json", str(result)],
           out / "logs" / f"score-{preds.parent.name}.log")
    return json.loads(result.read_text())["metrics"]


def run_meta(model: str, preds: Path) -> dict:
    """Parameters and seconds per training step (training epochs only: no setup, no evaluation)
    of one finished run."""
    if model.startswith("kdctl"):
        from kdctl.runs.summary import read_metrics

        rows = read_metrics(preds.parent)
        plan = next(r for r in rows if r.get("kind") == "plan")
        last = [r for r in rows if r.get("kind") == "train"][-1]
        return {"params": plan["detector"]["params"], "step_s": last["train_s"] / last["step"]}
    meta = json.loads(preds.with_suffix(".meta.json").read_text())
    return {"params": meta["params"], "step_s": meta["epoch_seconds"] / meta["steps"]}


def step_times(proto: dict, out: Path, threads: int, python: Path, data: tuple[Path, Path], rounds: int) -> dict:
    """Seconds per training step of kdctl-n and yolov8n on a quiet machine: ``rounds`` rounds, in
    each one 2-epoch run of each tool, one after the other (never two at once), same data, batch
    and threads; the median over rounds of each run's training seconds (no setup, no evaluation)
    per step."""
    short = dict(proto, epochs=2)
    times: dict[str, list[float]] = {"kdctl-n": [], "yolov8n": []}
    for r in range(rounds):
        for model in times:
            sub = out / "timing" / f"r{r}"
            if model == "kdctl-n":
                preds = kdctl_run(model, 100 + r, short, sub, threads)
            else:
                preds = peer_run(model, 100 + r, short, sub, threads, python, data)
            times[model].append(run_meta(model, preds)["step_s"])
    return {m: statistics.median(v) for m, v in times.items()} | {"rounds": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("protocol", choices=sorted(PROTOCOLS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--teacher-seeds", default=None, help="seeds of kdctl-s / yolov8s (default: --seeds)")
    p.add_argument("--models", default=",".join(KDCTL + PEER))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--peer-venv", type=Path, default=ROOT / "benchmarks" / ".peer-venv")
    p.add_argument("--step-rounds", type=int, default=3,
                   help="rounds of the quiet step-time comparison of kdctl-n and yolov8n after the table (0: none)")
    a = p.parse_args()
    proto = PROTOCOLS[a.protocol]
    seeds = [int(s) for s in a.seeds.split(",")]
    models = a.models.split(",")
    unknown = [m for m in models if m not in KDCTL + PEER]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(KDCTL + PEER)}")
    a.out.mkdir(parents=True, exist_ok=True)
    python = peer_python(a.peer_venv.resolve()) if any(m in PEER for m in models) else None
    data = export_data(proto, a.out)

    def one(job):
        model, seed = job
        start = time.perf_counter()
        if model in KDCTL:
            preds = kdctl_run(model, seed, proto, a.out, a.threads)
        else:
            preds = peer_run(model, seed, proto, a.out, a.threads, python, data)
        print(f"{model} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        return job, preds

    # teachers first (the distilled students need the seed-0 teachers), tools alternating
    first = [(m, 0) for m in ("kdctl-s", "yolov8s") if m in models or any(TEACHER_OF.get(x) == m for x in models)]
    teacher_seeds = seeds if a.teacher_seeds is None else [int(s) for s in a.teacher_seeds.split(",")]
    rest = [(m, s) for s in seeds for m in models
            if (m, s) not in first and (m not in TEACHER_OF.values() or s in teacher_seeds)]
    results = {}
    with ThreadPoolExecutor(a.jobs) as pool:
        for job, preds in pool.map(one, first):
            results[job] = preds
        for job, preds in pool.map(one, rest):
            results[job] = preds

    table = {}
    for model in models:
        runs = [(s, results[(model, s)]) for s in sorted({s for _, s in results}) if (model, s) in results]
        metrics = [score(preds, data[1], a.out) for _, preds in runs]
        meta = [run_meta(model, preds) for _, preds in runs]
        row = {"seeds": [s for s, _ in runs], "params": meta[0]["params"],
               "step_s": statistics.median(m["step_s"] for m in meta)}
        for key in ("AP", "AP50", "AP75"):
            vals = [100 * m[key] for m in metrics]
            row[key] = vals
        table[model] = row
    lines = [f"protocol {a.protocol}: {proto}", "", "| model | params | seeds | AP | AP50 | AP75 | per seed AP | s / step (loaded) |", "|---|---|---|---|---|---|---|---|"]
    for model, row in table.items():
        def ms(v):
            return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
        lines.append(f"| {model} | {row['params'] / 1e6:.2f} M | {len(row['seeds'])} | {ms(row['AP'])} | {ms(row['AP50'])} | "
                     f"{ms(row['AP75'])} | {', '.join(f'{v:.1f}' for v in row['AP'])} | {row['step_s']:.3f} |")
    if a.step_rounds and python is not None:
        steps = step_times(proto, a.out, a.threads, python, data, a.step_rounds)
        table["step_times"] = steps
        lines += ["", f"seconds per training step, one run at a time, {a.step_rounds} rounds (median): "
                  f"kdctl-n {steps['kdctl-n']:.3f}, yolov8n {steps['yolov8n']:.3f}, "
                  f"ratio {steps['kdctl-n'] / steps['yolov8n']:.2f}"]
    (a.out / "table.json").write_text(json.dumps(table, indent=1))
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
