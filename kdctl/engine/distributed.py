"""torch.distributed for kdctl: who this process is, the process group, and the few collectives
the engine needs.

kdctl never launches workers itself: ``kdctl train --nproc N`` hands the command to
``torch.distributed.run`` (torchrun, elastic), see :mod:`kdctl.engine.launch`. Inside a worker,
:func:`init_distributed` reads the environment torchrun writes (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), or SLURM's (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODELIST``) when a job was started by ``srun``
without torchrun. One process, no environment: world size 1 and no process group at all.

Backends: NCCL for CUDA devices, gloo for the CPU. A second gloo group carries the small
control messages (the stop flag of a preempted run) so that they never wait on the GPU.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kdctl.errors import KdctlError


@dataclass(frozen=True)
class DistInfo:
    """This process in the job: global ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


_INFO = DistInfo()
_CONTROL: Any = None  # the gloo group for control flags


def info() -> DistInfo:
    """The current process's :class:`DistInfo` (world size 1 before/without :func:`init_distributed`)."""
    return _INFO


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: ``"gpu[01-03,07],cpu1"`` ->
    ``["gpu01", "gpu02", "gpu03", "gpu07", "cpu1"]`` (zero padding kept)."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def env_from_slurm(environ: dict[str, str]) -> dict[str, str]:
    """The torchrun-style variables a process started by ``srun`` lacks (empty when not under
    SLURM, or when torchrun already set ``RANK``). ``MASTER_ADDR`` is the first host of the job
    and ``MASTER_PORT`` 29500 plus the job id's last three digits, unless already set."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    hosts = expand_nodelist(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST", "localhost"))
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or (hosts[0] if hosts else "localhost"),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(29500 + int(environ.get("SLURM_JOB_ID", "0")) % 1000),
    }


def init_distributed(device_spec: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the job described by the environment (torchrun or SLURM) and pick this rank's
    device: ``cuda:LOCAL_RANK`` when CUDA is used, else the CPU. Returns (info, device).

    Without a job (no ``WORLD_SIZE`` > 1) it only resolves ``device_spec`` like
    :func:`kdctl.engine.device.pick_device`. Idempotent."""
    from kdctl.engine.device import pick_device

    global _INFO, _CONTROL
    os.environ.update(env_from_slurm(dict(os.environ)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _INFO = DistInfo()
        return _INFO, pick_device(device_spec)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec)
    if device.type == "cuda":
        if torch.cuda.device_count() <= local:
            raise KdctlError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} CUDA device(s); "
                             "start at most one process per device (--nproc / --devices)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # torchrun keeps one key-value store across elastic restarts: a restarted group could read
        # the dead group's addresses (seen as gloo "connection refused"), so each restart round
        # gets its own key prefix
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timedelta(minutes=30)))
        store = dist.PrefixStore(f"kdctl/round{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(minutes=30))
        _CONTROL = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local)
    return _INFO, device


def shutdown() -> None:
    """Leave the process group (end of a run)."""
    global _INFO, _CONTROL
    if dist.is_initialized():
        dist.destroy_process_group()
    _INFO, _CONTROL = DistInfo(), None


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (``t`` itself in a single process). Used for the loss
    normalisers (number of positives, sums of quality weights), as MMDetection's heads do with
    ``reduce_mean(num_pos)``: each rank then divides its own sum by the global mean, and DDP's
    gradient average makes a 2 x b run match a 1 x 2b run. Not differentiable (normalisers are
    constants)."""
    if not _INFO.enabled:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return out / _INFO.world_size


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks, in place (``t`` in a single process)."""
    if _INFO.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank: a CPU all-reduce on the control group, which
    never waits for the GPU (the stop flag of a preempted run, checked every step)."""
    if not _INFO.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return bool(t.item())


def barrier() -> None:
    if _INFO.enabled:
        dist.barrier(group=_CONTROL)


def gather_lists(items: list) -> list:
    """Every rank's list concatenated in rank order, on every rank (sharded evaluation).
    The objects are kdctl's own result dicts, pickled between kdctl's own processes."""
    if not _INFO.enabled:
        return items
    parts: list[Any] = [None] * _INFO.world_size
    dist.all_gather_object(parts, items, group=_CONTROL)
    return [x for part in parts for x in part]


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _INFO.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]
