"""Scale-out on the CPU with gloo, as real processes: a 2-process run through torchrun writes one
set of checkpoints; a 2 x b step averages to the same gradients as a 1 x 2b step; SIGTERM
saves and exits 143 with the resume command; SIGKILL then --resume ends with the weights of an
uninterrupted run. Plus the launcher's and SLURM's argument handling."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kdctl.engine.distributed import env_from_slurm, expand_nodelist
from kdctl.engine.launch import torchrun_args, worker_args
from kdctl.engine.loader import EpochBatchSampler
from kdctl.engine.schedule import effective_lr

from conftest import ROOT

PY = sys.executable
KDCTL = [PY, "-m", "kdctl"]
TINY = [
    "data.shapes.val_images=8", "data.shapes.image_size=96", "data.short_side=96", "data.max_side=96",
    "data.num_workers=0", "model.student.backbone=test_resnet", "model.student.fpn_channels=32",
    "model.student.feat_channels=32", "model.student.stacked_convs=2", "train.warmup_iters=4", "train.log_every=1",
    "runtime.threads=1",
]


def sets(*items):
    return [x for item in items for x in ("--set", item)]


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        e.pop(k, None)
    return e


def step_of(path):
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])


def assert_same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ----------------------------------------------------------------------------- 2 processes
def test_two_process_run_writes_one_set_of_checkpoints(tmp_path):
    out = tmp_path / "run"
    cmd = [*KDCTL, "train", "shapes", "--nproc", "2", "--out", str(out), "--json",
           *sets(*TINY, "data.shapes.train_images=16", "data.batch_size=2", "train.epochs=2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # rank 0 alone prints: one JSON document
    assert summary["step"] == 8  # 16 images / (2 ranks x 2) per step x 2 epochs
    assert sorted(p.name for p in out.iterdir()) == [
        ".kdctl-run", "best.safetensors", "best.state.pt", "last.safetensors", "last.state.pt", "metrics.jsonl", "recipe.yaml"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, 9))  # logged once per step: by rank 0 only
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [4, 8]
    assert step_of(out / "last.safetensors") == 8
    # the gathered evaluation covers every validation image once: kdctl eval on one process agrees
    ev = subprocess.run([*KDCTL, "eval", str(out / "last.safetensors"), "--json", "-"], capture_output=True, text=True,
                        env=env(), timeout=120)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout)["metrics"]["AP"] == pytest.approx(rows[-1]["AP"], abs=1e-9)


def test_two_process_distillation_with_adapters(tmp_path):
    """DDP wraps the student and the adapters (a 64-wide teacher, a 32-wide student), not the
    teacher; the adapters are saved for resume; only the student is in the checkpoint."""
    data = sets(*TINY, "data.shapes.train_images=16", "data.batch_size=2", "train.epochs=1")
    wide = sets("model.teacher.backbone=test_resnet", "model.teacher.fpn_channels=64", "model.teacher.feat_channels=64",
                "model.teacher.stacked_convs=2")
    teacher = subprocess.run([*KDCTL, "train", "demo", "--model", "teacher", "--out", str(tmp_path / "t"), *data, *wide],
                             capture_output=True, text=True, env=env(), timeout=300)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    out = tmp_path / "s"
    proc = subprocess.run([*KDCTL, "distill", "demo", "--teacher", str(tmp_path / "t" / "last.safetensors"), "--nproc", "2",
                           "--method", "crosskd,ssim", "--out", str(out), *data, *sets("distill.losses.0.reuse_idx=2"),
                           "--json"], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["step"] == 4
    state = torch.load(out / "last.state.pt", weights_only=True)
    assert any(k.startswith("crosskd.adapters") for k in state["extra"]["kd"])
    assert not any(k.startswith(("teacher", "crosskd", "features")) for k in load_file(str(out / "last.safetensors")))


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_two_times_b_gradients_equal_one_times_2b(tmp_path, head):
    """Normalisers (positives, centerness sums) are averaged over ranks and DDP averages the
    gradients, so the first step's gradients match the single-process step on the union batch.
    (Not GFL at initialisation: its box-loss normaliser, the sum of predicted scores, is below 1
    and clamped to 1 on every rank, as in MMDetection, which breaks the equality by design.)"""
    # BatchNorm statistics frozen (norm_eval, as when fine-tuning a pretrained backbone): with
    # per-rank batch statistics the two runs differ by design (sync_bn on CUDA)
    common = sets(*TINY, f"model.student.head={head}", "data.shapes.train_images=8", "model.student.norm_eval=true")
    worker = str(ROOT / "tests" / "dist_grad_worker.py")
    one = subprocess.run([PY, worker, str(tmp_path / "one"), "4", *common], capture_output=True, text=True, env=env(),
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", worker,
                          str(tmp_path / "two"), "2", *common], capture_output=True, text=True, env=env(), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    g1 = torch.load(tmp_path / "one" / "grads.pt", weights_only=True)
    g2 = torch.load(tmp_path / "two" / "grads.pt", weights_only=True)
    assert g1.keys() == g2.keys() and len(g1) > 20
    for k in g1:
        scale = g1[k].abs().max().clamp(min=1e-6)
        assert (g1[k] - g2[k]).abs().max() <= 1e-4 * scale + 1e-7, k
    assert sum(bool(g.abs().max() > 0) for g in g1.values()) > 20  # not vacuous: real gradients


def test_each_rank_reads_its_slice_of_the_same_global_batches():
    one = EpochBatchSampler(10, 4, shuffle=True, seed=3, epoch=1)
    ranks = [EpochBatchSampler(10, 2, shuffle=True, seed=3, epoch=1, rank=r, world_size=2) for r in (0, 1)]
    for full, a, b in zip(one, *ranks):
        assert full[: len(a)] == a and full[len(a):] == b[: len(full) - len(a)]
    s = EpochBatchSampler(10, 2, shuffle=True, seed=3, epoch=0)
    s.set_epoch(1, 1)
    assert list(s) == list(EpochBatchSampler(10, 2, shuffle=True, seed=3, epoch=1))[1:]


# ----------------------------------------------------------------------------- preemption
RUN = sets(*TINY, "data.shapes.train_images=48", "data.batch_size=4", "train.epochs=2", "train.checkpoint_every=3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run that interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run([*KDCTL, "train", "shapes", "--out", str(out), *RUN], capture_output=True, text=True,
                          env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def wait_for(proc, ready, seconds=240):
    """Poll ``ready()`` while ``proc`` runs; fail with its stderr if it ends first or time runs out."""
    deadline = time.time() + seconds
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended or stalled first: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)


def logged_step(out):
    log = out / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return max(steps, default=0)


def start_and_wait_for_step(out, step):
    """Start the run; return the process once its metrics log has reached ``step``."""
    proc = subprocess.Popen([*KDCTL, "train", "shapes", "--out", str(out), *RUN], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    wait_for(proc, lambda: logged_step(out) >= step)
    return proc


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "run"
    proc = start_and_wait_for_step(out, 7)
    assert proc.poll() is None  # killed mid-run, not after it ended
    proc.kill()
    proc.communicate()
    kept = step_of(out / "last.safetensors")
    assert 3 <= kept < 24 and kept % 3 == 0  # a periodic checkpoint, not the end
    resumed = subprocess.run([*KDCTL, "train", "shapes", "--out", str(out), "--resume", *RUN], capture_output=True,
                             text=True, env=env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_of(out / "last.safetensors") == 24
    assert_same_weights(out / "last.safetensors", reference / "last.safetensors")


def test_sigterm_saves_exits_143_and_prints_a_resume_command_that_works(tmp_path, reference):
    out = tmp_path / "run"
    proc = start_and_wait_for_step(out, 5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # stopped, not finished (README, "Safety")
    assert "stopped by SIGTERM" in stdout
    stopped = step_of(out / "last.safetensors")
    assert 5 <= stopped < 24
    assert f"at step {stopped}" in stdout
    line = next(x for x in stdout.splitlines() if x.startswith("resume with: kdctl "))
    args = shlex.split(line[len("resume with: kdctl "):])
    assert args[-1] == "--resume" and args.count("--out") == 1
    resumed = subprocess.run([*KDCTL, *args], capture_output=True, text=True, env=env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(out / "last.safetensors", reference / "last.safetensors")


def test_two_process_run_stops_on_sigterm_and_resumes(tmp_path):
    """SIGTERM to the launcher: torchrun passes it to both workers, they agree on the step, rank 0
    saves, the launcher exits 143; the resumed 2-process run completes. With persistent data
    workers, which ignore the signal and are shut down by the trainer (else the exit hangs)."""
    out = tmp_path / "run"
    args = ["train", "shapes", "--nproc", "2", "--out", str(out),
            *sets(*TINY, "data.shapes.train_images=64", "data.batch_size=2", "train.epochs=2", "data.num_workers=1")]
    proc = subprocess.Popen([*KDCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    wait_for(proc, lambda: logged_step(out) >= 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "resume with: kdctl train shapes --nproc 2" in stdout
    stopped = step_of(out / "last.safetensors")
    assert 3 <= stopped < 32
    resumed = subprocess.run([*KDCTL, *args, "--resume"], capture_output=True, text=True, env=env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_of(out / "last.safetensors") == 32


def children(pid):
    """PIDs whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc (Linux)")
def test_elastic_restart_after_a_dead_worker_resumes_from_the_last_checkpoint(tmp_path):
    """SIGKILL one of two workers: torchrun (--max-restarts 1) restarts the group, which resumes
    from the last periodic checkpoint and finishes with the weights of an uninterrupted run."""
    common = ["--nproc", "2", *sets(*TINY, "data.shapes.train_images=48", "data.batch_size=2", "train.epochs=2",
                                    "train.checkpoint_every=2")]
    ref = subprocess.run([*KDCTL, "train", "shapes", "--out", str(tmp_path / "ref"), *common], capture_output=True,
                         text=True, env=env(), timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    proc = subprocess.Popen([*KDCTL, "train", "shapes", "--out", str(out), "--max-restarts", "1", *common],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    wait_for(proc, lambda: (out / "last.safetensors").is_file() and step_of(out / "last.safetensors") >= 4)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert step_of(out / "last.safetensors") == 24, stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # the log was cut back at the resumed step
    assert_same_weights(out / "last.safetensors", tmp_path / "ref" / "last.safetensors")


# ----------------------------------------------------------------------------- launcher, SLURM, lr rule
def test_launcher_strips_its_own_flags_and_builds_torchrun_arguments():
    argv = ["train", "coco", "--nproc", "4", "--devices=0,1,2,3", "--set", "train.lr=0.02", "--max-restarts", "2"]
    assert worker_args(argv) == ["train", "coco", "--set", "train.lr=0.02"]
    single = torchrun_args(argv, nproc=4, max_restarts=2)
    assert single[:3] == ["--nproc-per-node=4", "--max-restarts=2", "--standalone"]
    assert single[3:] == ["--module", "kdctl", "train", "coco", "--set", "train.lr=0.02"]
    static = torchrun_args(argv, nproc=8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29400")
    assert "--node-rank=1" in static and "--master-addr=node0" in static and "--master-port=29400" in static
    elastic = torchrun_args(argv, nproc=8, nnodes=2, rdzv_endpoint="node0:29400")
    assert "--rdzv-backend=c10d" in elastic and "--rdzv-endpoint=node0:29400" in elastic


def test_multi_node_needs_an_endpoint_and_devices_need_cuda(tmp_path):
    proc = subprocess.run([*KDCTL, "train", "shapes", "--nnodes", "2", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 2 and "--rdzv-endpoint" in proc.stderr and "Traceback" not in proc.stderr
    if not torch.cuda.is_available():
        proc = subprocess.run([*KDCTL, "train", "shapes", "--devices", "0,1", "--out", str(tmp_path / "r")],
                              capture_output=True, text=True, env=env(), timeout=120)
        assert proc.returncode == 2 and "--nproc" in proc.stderr and "Traceback" not in proc.stderr


def test_slurm_environment_becomes_torchrun_style():
    assert expand_nodelist("gpu[01-03,07],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu1"]
    assert expand_nodelist("a1,b[8-10]") == ["a1", "b8", "b9", "b10"]
    got = env_from_slurm({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                          "SLURM_NODELIST": "gpu[12-15]", "SLURM_JOB_ID": "4242"})
    assert got == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu12", "MASTER_PORT": "29742"}
    assert env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}  # a single task: no group
    assert env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "RANK": "0"}) == {}  # torchrun inside srun


def test_linear_lr_scaling_rule():
    assert effective_lr(0.01, 2, 8, "linear", 16) == pytest.approx(0.01)
    assert effective_lr(0.01, 2, 1, "linear", 16) == pytest.approx(0.00125)
    assert effective_lr(0.01, 4, 8, "linear", 16) == pytest.approx(0.02)
    assert effective_lr(0.01, 2, 1, "off", 16) == 0.01


def test_runtime_compile_trains_like_eager_and_saves_plain_keys(tmp_path):
    """torch.compile (inductor on the CPU here; about a minute of compilation) of backbone and
    FPN: the same first-step losses as eager, and a checkpoint with the plain parameter names
    that eval and export read."""
    common = sets(*TINY, "data.shapes.train_images=8", "data.batch_size=4", "train.epochs=1")
    for name, extra in (("eager", []), ("compiled", sets("runtime.compile=true"))):
        proc = subprocess.run([*KDCTL, "train", "shapes", "--out", str(tmp_path / name), *common, *extra],
                              capture_output=True, text=True, env=env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    first = [[r for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"][0]
             for n in ("eager", "compiled")]
    for key in ("loss_cls", "loss_bbox", "loss_dfl"):
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-4, abs=1e-6), key
    assert load_file(str(tmp_path / "eager" / "last.safetensors")).keys() == \
        load_file(str(tmp_path / "compiled" / "last.safetensors")).keys()
