"""Training-step throughput, peak memory and inference latency of kdctl's detectors against
torchvision's RetinaNet, all measured in one run on identical inputs.

Models (ResNet-50-FPN, 80 classes, random init, ``torch.manual_seed(0)`` before each build):

- ``kdctl-retinanet``: ``build_detector(detector_config(head="retinanet", backbone="resnet50",
  frozen_stages=1, norm_eval=True), num_classes=80)``; norm "auto" = mmdet's plain-conv head.
- ``torchvision-retinanet``: ``retinanet_resnet50_fpn(weights=None, weights_backbone=None,
  num_classes=80, min_size=S, max_size=S, detections_per_img=100)``, then frozen to match:
  without backbone weights torchvision ignores ``trainable_backbone_layers`` (it warns and makes
  all 5 layers trainable) and builds trainable ``nn.BatchNorm2d``. So the script freezes the
  stem + layer1 itself (torchvision's ``trainable_backbone_layers=3`` = kdctl
  ``frozen_stages=1``) and keeps every BatchNorm in eval mode with trainable affine weights,
  which is exactly kdctl's ``norm_eval=True``. Same 9 anchors per location, same 4x256 plain
  conv towers, same max-IoU 0.5/0.4 matching with low-quality matches, focal + L1 losses.
  One architectural difference remains and is torchvision's own: its P6 conv reads P5
  (256 channels), mmdet/kdctl's reads C5 (2048 channels): kdctl does 0.5 GFLOP more per
  512-px image forward (under 1% of a step; see the GFLOP column) and has 4.1 M more
  parameters (more weight decay / momentum work in SGD).
- ``torchvision-retinanet-frozenbn`` (optional, ``--models``): what torchvision builds when a
  backbone checkpoint is given: ``FrozenBatchNorm2d`` everywhere (affine not trained) and
  ``trainable_backbone_layers=3``; built by hand with the same helpers, no download.
- ``kdctl-gfl``: the same with ``head="gfl"`` (GroupNorm towers, ATSS, QFL + GIoU + DFL).

Inputs: ``B`` images of ``kdctl.data.shapes.ShapesDataset(seed=0)`` rendered at ``S x S`` px,
as float32 RGB in [0, 1], with their boxes and labels (10 shape classes). Ignore regions are
dropped because torchvision has none. kdctl gets a ``Batch`` built by ``collate`` and
normalises ``(x - mean) / std`` with ImageNet mean/std **inside** the timed step; torchvision
gets the list of the same [0, 1] images and the ``{boxes, labels}`` dicts, and its
``GeneralizedRCNNTransform`` normalises, "resizes" at scale 1.0 (``min_size = max_size = S``,
so no 800-px upscale; it still runs one bilinear interpolate) and pads to a multiple of 32
inside the timed step (its cost alone is printed). Both pad to the same size.

Training step (identical for all): ``zero_grad(set_to_none=True)``; forward + loss under
``torch.autocast`` when ``--amp bf16``; ``sum(losses).backward()``; ``SGD(lr=0.01 * B / 16,
momentum=0.9, weight_decay=1e-4).step()`` over the parameters with ``requires_grad``. No
gradient clipping, no host sync (on CUDA one ``synchronize`` closes each timed block).
The first warm-up step is run under ``torch.utils.flop_counter.FlopCounterMode`` and gives
the GFLOP per step column (forward + backward, as counted by PyTorch).

Timing: ``--warmup`` steps per model, then ``--rounds`` rounds; in each round every model runs
``--steps`` steps timed with ``time.perf_counter``; the model order rotates by one each round,
so machine noise falls on all models. Reported: median img/s over rounds, and the ratio
kdctl/torchvision both as a ratio of medians and as the median of the per-round ratios.
"CPU s/img" is the process CPU time (user + sys, all threads) per image: a cross-check that
other processes on a shared machine disturb less than wall time (with several threads it
also counts OpenMP spin-waiting).

Peak memory: each model in its own subprocess (this script re-run with ``--memory-probe``):
on CPU (Linux), the kernel's peak-RSS mark (``VmHWM``) is reset just before the first of
``--memory-steps`` training steps and read after the last, minus the RSS at the reset (model,
optimizer and inputs built), i.e. what training adds: gradients, momentum buffers, the step's
activations and allocator slack. (``getrusage().ru_maxrss`` is only a fallback: on Linux a
child inherits its parent's RSS at fork time in it.) On CUDA, ``torch.cuda.max_memory_allocated``
over the steps (absolute, weights included).

Inference: batch 1 (the first image), ``model.eval()``, ``torch.no_grad()``, freshly built
models (same seed as above, untrained): kdctl normalises and calls ``model.predict(images,
valid_sizes, scales)`` (forward + decode + NMS); torchvision calls ``model([image])``
(transform + forward + postprocess). Both keep the 1000 best candidates per level, run
class-wise NMS (IoU 0.5 for RetinaNet; GFL's own 0.6) and keep 100. The score threshold is
the same for all, ``--score-thr`` 0.0 by default: untrained scores sit near the 0.01 prior, so
at the usual 0.05 no candidate would pass and NMS would not be measured at all; at 0.0 every
postprocess does its full work (the detection counts are printed).

Run: ``.venv/bin/python benchmarks/bench_train.py [--size 512] [--batch 2] [--steps 2]
[--rounds 3] [--threads N] [--device cpu|cuda] [--amp off|bf16] [--json OUT] [--profile]``
(under 2 minutes with the defaults on a quiet 2-core CPU, about 3.5 with ``--threads 1``).
On a CPU shared with other work, ``--threads 1`` is the robust setting: with 2 threads on 2
busy cores every OpenMP region waits for a descheduled thread, and steps slow down 3-7x.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

from kdctl.data.collate import collate
from kdctl.data.shapes import ShapesDataset

MODELS = ("kdctl-retinanet", "torchvision-retinanet", "kdctl-gfl", "torchvision-retinanet-frozenbn")
DEFAULT_MODELS = "kdctl-retinanet,torchvision-retinanet,kdctl-gfl"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_CLASSES = 80


# ---------------------------------------------------------------------------- models and inputs
def build(name: str, size: int) -> nn.Module:
    """One of :data:`MODELS`, random init (seeded), on the CPU, frozen as the docstring says."""
    torch.manual_seed(0)
    if name.startswith("kdctl-"):
        from kdctl.models.detector import build_detector
        from kdctl.recipe import detector_config

        cfg = detector_config(head=name.split("-", 1)[1], backbone="resnet50", frozen_stages=1, norm_eval=True)
        return build_detector(cfg, num_classes=NUM_CLASSES)
    common = dict(num_classes=NUM_CLASSES, min_size=size, max_size=size, detections_per_img=100)
    if name == "torchvision-retinanet-frozenbn":
        from torchvision.models import resnet50
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.models.detection.retinanet import RetinaNet
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7
        from torchvision.ops.misc import FrozenBatchNorm2d

        # retinanet_resnet50_fpn's own code path for weights_backbone != None, minus the download
        body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        return RetinaNet(_resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)), **common)
    from torchvision.models.detection import retinanet_resnet50_fpn

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Changing trainable_backbone_layers")
        model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, trainable_backbone_layers=3, **common)
    for pname, param in model.backbone.body.named_parameters():  # stem + layer1 frozen, as kdctl frozen_stages=1
        if not pname.startswith(("layer2.", "layer3.", "layer4.")):
            param.requires_grad_(False)
    return model


def set_train(model: nn.Module) -> None:
    """``.train()``; torchvision's BatchNorms back to eval mode (= kdctl's norm_eval, which
    kdctl's Backbone.train already applies)."""
    model.train()
    if not hasattr(model, "detection_loss"):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


def make_inputs(size: int, batch: int, device: torch.device) -> dict:
    """The shared inputs: kdctl ``Batch`` (images in [0, 1]) and torchvision's image list and
    target dicts, holding the same tensors."""
    ds = ShapesDataset(num_images=batch, image_size=size, num_classes=10, seed=0)
    samples = [{
        "image": ds.load_image(rec).float().div_(255.0), "boxes": torch.from_numpy(rec.boxes),
        "labels": torch.from_numpy(rec.labels), "ignore": torch.zeros(0, 4),
        "ignore_labels": torch.zeros(0, dtype=torch.long), "image_id": rec.image_id, "orig_size": (size, size),
    } for rec in ds.records]
    kd = collate(samples, pad_divisor=32).to(device)
    return {
        "batch": kd,
        "tv_images": list(kd.images[:, :, :size, :size].unbind(0)),
        "tv_targets": [{"boxes": s["boxes"].to(device), "labels": s["labels"].to(device)} for s in samples],
        "mean": torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
        "std": torch.tensor(STD, device=device).view(1, 3, 1, 1),
        "num_boxes": int(kd.gt_mask.sum()),
    }


def make_step(name: str, model: nn.Module, inputs: dict, lr: float, amp: str, device: torch.device):
    """A closure running one training step; returns the total loss tensor (no sync)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    ac = dict(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    kd, mean, std = inputs["batch"], inputs["mean"], inputs["std"]
    images, targets = inputs["tv_images"], inputs["tv_targets"]

    def kdctl_losses():
        return model.loss(model((kd.images - mean) / std), kd)

    def tv_losses():
        return model(images, targets)

    losses_fn = kdctl_losses if name.startswith("kdctl-") else tv_losses

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**ac):
            losses = losses_fn()
        total = sum(losses.values())
        total.backward()
        opt.step()
        return total.detach()

    return step


def make_infer(name: str, model: nn.Module, inputs: dict, amp: str, score_thr: float, device: torch.device):
    """A closure detecting on the first image (batch 1); returns the number of detections."""
    kd, mean, std = inputs["batch"], inputs["mean"], inputs["std"]
    image01 = kd.images[:1]
    ac = dict(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")

    def run() -> int:
        with torch.no_grad(), torch.autocast(**ac):
            if name.startswith("kdctl-"):
                det = model.predict((image01 - mean) / std, kd.valid_sizes[:1], kd.scales[:1], score_thr=score_thr)
                return det.scores.shape[0]
            return model([inputs["tv_images"][0]])[0]["scores"].shape[0]

    return run


# ---------------------------------------------------------------------------- measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device, cpu: list | None = None) -> float:
    """Wall seconds for ``n`` calls of ``fn``, synchronised at both ends; appends the process
    CPU seconds (all threads) to ``cpu`` when given."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    sync(device)
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return time.perf_counter() - start


def step_gflop(step) -> tuple[float, torch.Tensor]:
    """Run one step under FlopCounterMode: (GFLOP counted, loss)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = step()
    return counter.get_total_flops() / 1e9, loss


def _proc_status_mib(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status (Linux), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS: VmHWM on Linux, else ``ru_maxrss`` (which on Linux would also carry the
    parent's RSS at fork time into a child: hence VmHWM first)."""
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def memory_probe(args, device: torch.device) -> None:
    """Child process: build one model, train ``--memory-steps`` steps, print one JSON line."""
    inputs = make_inputs(args.size, args.batch, device)
    model = build(args.memory_probe, args.size).to(device)
    set_train(model)
    step = make_step(args.memory_probe, model, inputs, 0.01 * args.batch / 16, args.amp, device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        reset_peak_rss()
        before = _proc_status_mib("VmRSS") or peak_rss_mib()
    for _ in range(args.memory_steps):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    print("MEMORY " + json.dumps({"peak_mib": peak, "added_mib": peak - before, "before_mib": before}))


def run_memory_probes(args, names: list[str]) -> dict:
    res = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", name, "--size", str(args.size),
               "--batch", str(args.batch), "--device", args.device, "--amp", args.amp,
               "--memory-steps", str(args.memory_steps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"memory probe {name} failed: {tail}")
            continue
        res[name] = json.loads(line[len("MEMORY "):])
    return res


def profile_steps(steps: dict, row_limit: int) -> dict:
    """One profiled training step per model: the top ops by self CPU time (ms)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, step in steps.items():
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        print(f"\n## profile: {name}, one step, total self CPU {total:.0f} ms")
        print(f"{'op':<48}{'calls':>7}{'self ms':>10}{'%':>7}")
        rows = []
        for e in events[:row_limit]:
            ms = e.self_cpu_time_total / 1e3
            print(f"{e.key[:47]:<48}{e.count:>7}{ms:>10.1f}{100 * ms / total:>6.1f}%")
            rows.append({"op": e.key, "calls": e.count, "self_ms": ms})
        out[name] = {"total_self_ms": total, "top": rows}
    return out


def fmt_m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def main() -> None:
    ap = argparse.ArgumentParser(description="Training-step throughput, peak memory and inference latency: kdctl vs torchvision RetinaNet.")
    ap.add_argument("--size", type=int, default=512, help="image side, pixels (square images)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per model per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model, >= 1 (the first is FLOP-counted)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--amp", choices=("off", "bf16"), default="off")
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--infer-iters", type=int, default=2, help="inference calls per model per round; 0 skips")
    ap.add_argument("--score-thr", type=float, default=0.0, help="inference score threshold of every model")
    ap.add_argument("--memory-steps", type=int, default=2, help="training steps of each memory probe; 0 skips")
    ap.add_argument("--profile", action="store_true", help="also profile one step per model (torch.profiler)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_probe:
        memory_probe(args, device)
        return
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--warmup, --steps and --rounds must be at least 1")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"device {device}, threads {torch.get_num_threads()}, amp {args.amp}")
    print(f"# {args.size} px, batch {args.batch}, {args.warmup} warm-up + {args.rounds} rounds x {args.steps} steps "
          f"per model, interleaved; load average {os.getloadavg()[0]:.2f}")

    inputs = make_inputs(args.size, args.batch, device)
    lr = 0.01 * args.batch / 16
    models, steps, info = {}, {}, {}
    for name in names:
        model = build(name, args.size).to(device)
        set_train(model)
        models[name] = model
        steps[name] = make_step(name, model, inputs, lr, args.amp, device)
        info[name] = {"params": sum(p.numel() for p in model.parameters()),
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    print(f"# {inputs['num_boxes']} GT boxes in the batch; warming up (first step FLOP-counted)")
    for name in names:
        info[name]["gflop_per_step"], loss = step_gflop(steps[name])
        info[name]["first_loss"] = float(loss)
        for _ in range(args.warmup - 1):
            steps[name]()

    img_s, cpu_s = {n: [] for n in names}, {n: [] for n in names}
    last = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            holder = []
            cpu = []
            dt = timed(lambda: holder.append(steps[name]()), args.steps, device, cpu)
            img_s[name].append(args.batch * args.steps / dt)
            cpu_s[name].append(cpu[0] / (args.batch * args.steps))
            last[name] = holder[-1]
        print(f"round {r + 1}: " + "  ".join(f"{n} {img_s[n][-1]:.3f}" for n in names) + " img/s")
    for name in names:
        info[name]["train_img_s"] = statistics.median(img_s[name])
        info[name]["train_img_s_rounds"] = img_s[name]
        info[name]["cpu_s_per_img"] = statistics.median(cpu_s[name])
        info[name]["last_loss"] = float(last[name])

    transform_ms = None
    tv = next((n for n in names if n.startswith("torchvision-")), None)
    if tv is not None:  # torchvision's own input pipeline, inside its timed step: its cost alone
        tr = models[tv].transform
        transform_ms = 1000 * min(timed(lambda: tr(inputs["tv_images"], inputs["tv_targets"]), 1, device) for _ in range(5))

    profile = None
    if args.profile:
        profile = profile_steps(steps, 25)

    del models, steps, model
    if args.infer_iters > 0:  # fresh models (same seed): untrained, identical state for every run
        runs = {}
        for name in names:
            model = build(name, args.size).to(device).eval()
            if not name.startswith("kdctl-"):
                model.score_thresh = args.score_thr
            runs[name] = make_infer(name, model, inputs, args.amp, args.score_thr, device)
            info[name]["detections"] = runs[name]()  # warm-up
        lat = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                for _ in range(args.infer_iters):
                    lat[name].append(1000 * timed(runs[name], 1, device))
        for name in names:
            info[name]["infer_ms"] = statistics.median(lat[name])
            info[name]["infer_ms_all"] = lat[name]
        del runs

    memory = run_memory_probes(args, names) if args.memory_steps > 0 else {}
    mem_method = ("torch.cuda.max_memory_allocated over the steps (absolute, weights included)" if device.type == "cuda" else
                  f"peak RSS (VmHWM, reset before the steps) minus RSS before the first step, over {args.memory_steps} "
                  "training steps, one subprocess per model")

    print()
    header = (f"{'model':<32}{'params':>9}{'trainable':>10}{'GFLOP/step':>11}{'train img/s':>12}  {'rounds':<24}"
              f"{'CPU s/img':>10}{'mem MiB':>9}{'infer ms':>10}{'dets':>5}")
    print(header)
    print("-" * len(header))
    for name in names:
        d = info[name]
        rounds = " ".join(f"{v:.3f}" for v in d["train_img_s_rounds"])
        mem = memory.get(name, {}).get("added_mib" if device.type == "cpu" else "peak_mib")
        mem_s = "-" if mem is None else f"{mem:.0f}"
        infer_s = f"{d['infer_ms']:.1f}" if "infer_ms" in d else "-"
        print(f"{name:<32}{fmt_m(d['params']):>9}{fmt_m(d['trainable']):>10}{d['gflop_per_step']:>11.0f}"
              f"{d['train_img_s']:>12.3f}  {rounds:<24}{d['cpu_s_per_img']:>10.2f}{mem_s:>9}{infer_s:>10}{d.get('detections', '-'):>5}")
    if memory:
        print(f"\nmemory: {mem_method}")
    if transform_ms is not None:
        print(f"torchvision GeneralizedRCNNTransform (normalise + scale-1 resize + pad) alone: {transform_ms:.1f} ms per batch of {args.batch}")
    print("losses first/last step: " + ", ".join(f"{n} {info[n]['first_loss']:.3f}/{info[n]['last_loss']:.3f}" for n in names))

    ratios = {}
    for peer in ("torchvision-retinanet", "torchvision-retinanet-frozenbn"):
        if "kdctl-retinanet" not in info or peer not in info:
            continue
        a, b = info["kdctl-retinanet"], info[peer]
        per_round = statistics.median(x / y for x, y in zip(a["train_img_s_rounds"], b["train_img_s_rounds"]))
        r = {"train": a["train_img_s"] / b["train_img_s"], "train_per_round_median": per_round,
             "train_cpu_time": b["cpu_s_per_img"] / a["cpu_s_per_img"]}
        if "infer_ms" in a:
            r["infer_speed"] = b["infer_ms"] / a["infer_ms"]
        if "kdctl-retinanet" in memory and peer in memory:
            key = "added_mib" if device.type == "cpu" else "peak_mib"
            r["memory"] = memory["kdctl-retinanet"][key] / memory[peer][key]
        ratios[f"kdctl-retinanet/{peer}"] = r
        extra = f", inference speed {r['infer_speed']:.2f}x" if "infer_speed" in r else ""
        extra += f", memory {r['memory']:.2f}x" if "memory" in r else ""
        print(f"ratio kdctl-retinanet / {peer}: training throughput {r['train']:.2f}x "
              f"(median of per-round ratios {per_round:.2f}x; by process CPU time {r['train_cpu_time']:.2f}x){extra}")

    if args.json:
        result = {
            "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()},
            "args": {k: v for k, v in vars(args).items() if k != "memory_probe"},
            "models": info, "memory": memory, "memory_method": mem_method,
            "torchvision_transform_ms": transform_ms, "ratios": ratios, "profile": profile,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
