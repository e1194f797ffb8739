"""Where the real-time family stands: detectors trained on one protocol, side by side.

For each ``--run NAME=DIR[,DIR...]`` (runs of one detector on the same protocol, one per seed,
e.g. the ``none`` runs of ``bench_distill.py efficacy`` for ``demo`` and ``demo-yolo``):

- accuracy: mean ± sample std over the runs of the **final** evaluation's AP, AP50, AP75;
- size: parameters, and FLOPs of one forward pass at ``--size`` (640 x 640;
  :func:`kdctl.export.profile.count_flops`: 2 per multiply-accumulate of convolutions);
- training cost: seconds per training step (forward, losses, backward, AdamW step) on one fixed
  batch of the protocol's training data, every detector interleaved in each of ``--rounds``
  rounds (the median), at ``--threads`` torch threads;
- deployment: CPU latency at ``--size``, batch 1, of the end-to-end ONNX file of the first run's
  final weights (``kdctl export --end-to-end``: decode and NMS in the graph), as ``kdctl predict``
  runs it (:meth:`kdctl.export.model_file.ModelFile.detect` on one letterboxed uint8 image), at 1
  and 2 onnxruntime threads, interleaved.

    python benchmarks/bench_realtime.py --run gfl-r10t=/work/bench-out/eff/none-s0,... \\
        --run yolo-n=/work/bench-out/yolo/gfl/none-s0,...
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_distill import _final_eval as final_eval, first_batch  # benchmarks/ is the script's folder


def train_step_fn(run: Path):
    """A closure running one training step of ``run``'s student on the first batch of its data."""
    from kdctl.data import build_dataset
    from kdctl.distill.methods import build_distiller
    from kdctl.models.detector import build_detector
    from kdctl.recipe import load_recipe

    recipe = load_recipe(str(run / "recipe.yaml"))
    torch.manual_seed(0)
    data = build_dataset(recipe.data, "train")
    model = build_detector(recipe.model.student, len(data.classes))
    distiller = build_distiller(model, None, []).train()
    opt = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-4)
    batch = first_batch(data, recipe, model)

    def step():
        opt.zero_grad(set_to_none=True)
        sum(distiller(batch).values()).backward()
        opt.step()

    return step, tuple(batch.images.shape)


def rotated(fns: dict, rounds: int, warmup: int = 2) -> dict:
    """Median seconds of each ``fns[k]()`` over ``rounds`` rounds, one call of each per round,
    the order rotated every round (training steps: :func:`kdctl.export.profile.interleaved_ms`
    runs under ``no_grad``)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for k in order[r % len(order):] + order[: r % len(order)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=DIR[,DIR...]: final runs of one detector")
    ap.add_argument("--size", type=int, nargs=2, default=[640, 640])
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the training steps")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20, help="latency calls per runtime and thread count")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from kdctl.export import export_detector
    from kdctl.export.profile import count_flops, count_params, interleaved_ms
    from kdctl.export.model_file import load_model_file
    from kdctl.export.source import read_detector
    from kdctl.export.verify import letterboxed

    groups = {}
    for item in args.run:
        name, _, dirs = item.partition("=")
        groups[name] = [Path(d) for d in dirs.split(",") if d]
    size = tuple(args.size)
    rows = {}
    for name, runs in groups.items():
        finals = [final_eval(r) for r in runs]
        ckpt = str(runs[0] / "last.safetensors")
        src = read_detector(ckpt)
        model = src.model.eval()
        rows[name] = {"runs": [str(r) for r in runs], **{k: [100 * f[k] for f in finals] for k in ("AP", "AP50", "AP75")},
                      "params": count_params(model), "flops": count_flops(model, size), "ckpt": ckpt}

    torch.set_num_threads(args.threads)
    steps, shapes = {}, {}
    for name, r in rows.items():
        steps[name], shapes[name] = train_step_fn(Path(r["runs"][0]))
    for name, s in rotated(steps, args.rounds).items():
        rows[name]["s_per_step"] = s

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, r in rows.items():
            files[name] = Path(tmp) / f"{name}.onnx"
            export_detector(r["ckpt"], "onnx", out=files[name], input_size=size, runs=0, force=True, end_to_end=True)
        src = read_detector(rows[next(iter(rows))]["ckpt"])
        from kdctl.data import build_dataset

        ds = build_dataset(src.recipe.data, "val")
        x, valid, scales = letterboxed([ds.load_image(ds.records[0])], size, src.model.mean)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            models = {n: load_model_file(f, threads=threads) for n, f in files.items()}
            fns = {n: (lambda x, m=m: m.detect(x, valid, scales)) for n, m in models.items()}
            for name, t_ms in interleaved_ms(fns, x, args.runs).items():
                rows[name][f"e2e_ms_{threads}t"] = t_ms

    def ms(v):
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    first = next(iter(rows.values()))
    print(f"training step: batch {shapes[next(iter(rows))]}, {args.threads} threads, median of {args.rounds} rounds; "
          f"latency: end-to-end ONNX at {size[0]}x{size[1]}, batch 1, median of {args.runs} calls")
    print("| detector | AP | AP50 | AP75 | params | GFLOPs | s/step | e2e ms (1 thread) | e2e ms (2 threads) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {ms(r['AP'])} | {ms(r['AP50'])} | {ms(r['AP75'])} | {r['params'] / 1e6:.2f} M | "
              f"{r['flops'] / 1e9:.2f} | {r['s_per_step']:.3f} | {r['e2e_ms_1t']:.0f} | {r['e2e_ms_2t']:.0f} |")
    for name, r in list(rows.items())[1:]:
        print(f"{name} / {next(iter(rows))}: params {r['params'] / first['params']:.2f}x, FLOPs "
              f"{r['flops'] / first['flops']:.2f}x, step {r['s_per_step'] / first['s_per_step']:.2f}x, latency "
              f"{r['e2e_ms_1t'] / first['e2e_ms_1t']:.2f}x (1 thread) {r['e2e_ms_2t'] / first['e2e_ms_2t']:.2f}x (2)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
