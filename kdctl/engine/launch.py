"""``kdctl train/distill --nproc N | --devices 0,1,...``: hand the same command to
``torch.distributed.run`` (torchrun, elastic) instead of launching workers ourselves.

The launcher process starts ``python -m kdctl <the same arguments minus the launch flags>``
once per device through torchrun's elastic agent; each worker then joins the group from the
environment torchrun wrote (:func:`kdctl.engine.distributed.init_distributed`). Starting kdctl
with ``torchrun ... -m kdctl train ...`` yourself, or under SLURM's ``srun``, does the same.

- one node: ``--standalone`` rendezvous on a free local port;
- several nodes: ``--nnodes N --rdzv-endpoint HOST:PORT`` on every node; with ``--node-rank``
  the static rendezvous (fixed ranks, HOST is rank 0's address), without it torchrun's elastic
  c10d rendezvous (ranks assigned on arrival);
- ``--max-restarts K``: torchrun restarts the whole group up to K times after a worker dies;
  the restarted workers resume from the run's last checkpoint
  (``TORCHELASTIC_RESTART_COUNT`` > 0, see :class:`kdctl.engine.trainer.Trainer`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from kdctl.errors import KdctlError

# flags that belong to the launcher and are not passed on to the workers (all take a value)
LAUNCH_FLAGS = ("--nproc", "--devices", "--nnodes", "--node-rank", "--rdzv-endpoint", "--max-restarts")


def in_worker() -> bool:
    """True inside a process started by torchrun (or srun with several tasks)."""
    slurm_task = "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return "LOCAL_RANK" in os.environ or slurm_task


def worker_args(argv: list[str]) -> list[str]:
    """``argv`` (after the program name) without the launch flags and their values."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def parse_devices(devices: str) -> list[int]:
    try:
        ids = [int(d) for d in devices.split(",") if d.strip()]
    except ValueError:
        raise KdctlError(f"--devices: expected CUDA device indices like 0,1,2,3, got {devices!r}") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise KdctlError(f"--devices: expected distinct CUDA device indices like 0,1,2,3, got {devices!r}")
    return ids


def torchrun_args(argv: list[str], *, nproc: int, nnodes: int = 1, node_rank: int | None = None,
                  rdzv_endpoint: str | None = None, max_restarts: int = 0) -> list[str]:
    """torchrun's command line for running ``kdctl <argv>`` on ``nproc`` processes per node."""
    args = [f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    if nnodes == 1 and rdzv_endpoint is None:
        args.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise KdctlError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        if node_rank is not None:
            host, _, port = rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise KdctlError(f"--rdzv-endpoint: expected HOST:PORT, got {rdzv_endpoint!r}")
            args += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={host}", f"--master-port={port}"]
        else:
            args += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=kdctl"]
    return [*args, "--module", "kdctl", *worker_args(argv)]


def launch(argv: list[str], *, nproc: int | None, devices: str | None, nnodes: int, node_rank: int | None,
           rdzv_endpoint: str | None, max_restarts: int, run_dir: Path | None = None) -> int:
    """Run ``kdctl <argv>`` under torchrun; returns its exit code: 0 when every worker ended
    well, 128 + N when signal N stopped them (after ``run_dir/last.safetensors`` was written,
    when they had got that far), else the first failing worker's code."""
    if devices is not None:
        ids = parse_devices(devices)
        if nproc is not None and nproc != len(ids):
            raise KdctlError(f"--nproc {nproc} does not match --devices {devices} ({len(ids)} devices); give one of them")
        import torch

        if not torch.cuda.is_available():
            raise KdctlError("--devices selects CUDA devices but none is available; on the CPU use --nproc N")
        if max(ids) >= torch.cuda.device_count():
            raise KdctlError(f"--devices {devices}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
        nproc = len(ids)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(argv, nproc=nproc or 1, nnodes=nnodes, node_rank=node_rank,
                                                      rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts))
    os.environ[ARGV_ENV] = json.dumps(argv)  # the workers print the full command in their resume hint
    started = time.time()
    try:
        run(args)
    except ChildFailedError as exc:
        # the failing worker has already printed its own error line
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c and c > 0), 1)
    except SignalException as exc:
        # SIGTERM/SIGINT: torchrun passed it on to the workers, which finish their step, save the
        # last checkpoint and print the resume command before it shuts them down
        # (or kills them when they were still starting up and had nothing to save); either way
        # the exit code is 128 + the signal's number, as for one process (README, "Safety")
        last = None if run_dir is None else Path(run_dir) / "last.safetensors"
        if not (last is not None and last.is_file() and last.stat().st_mtime >= started):
            print(f"kdctl: stopped by {exc.sigval.name} before a checkpoint was written", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


ARGV_ENV = "KDCTL_LAUNCH_ARGV"


def program_args() -> list[str]:
    """The command line after the program name (``kdctl`` or ``python -m kdctl``) as the user
    typed it: in a worker started by :func:`launch`, the launcher's, launch flags included."""
    if ARGV_ENV in os.environ and in_worker():
        return list(json.loads(os.environ[ARGV_ENV]))
    return list(sys.argv[1:])
