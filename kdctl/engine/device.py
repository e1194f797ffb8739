"""Device, threads, seeds, determinism and autocast: the process-wide settings of a run."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from kdctl.errors import KdctlError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(spec: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; ``cpu``, ``cuda``,
    ``cuda:N`` as given (KdctlError when CUDA is asked for but absent)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, _, idx = str(spec).partition(":")
    if base not in ("cpu", "cuda", "mps") or (idx and (not idx.isdigit() or base == "cpu")):
        raise KdctlError(f"--device / runtime.device: unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if base == "cuda" and not torch.cuda.is_available():
        raise KdctlError(f"runtime.device is {spec!r} but no CUDA device is available; use 'cpu' or 'auto'")
    if base == "cuda" and idx and int(idx) >= torch.cuda.device_count():
        raise KdctlError(f"--device / runtime.device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(spec)


def setup_runtime(*, threads: int | None, seed: int, deterministic: bool) -> None:
    """Threads, every RNG seeded with ``seed``, and (``deterministic``) PyTorch's deterministic
    algorithms with cuDNN autotuning off, so two runs give identical weights."""
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (all devices) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_amp(amp: str, device: torch.device) -> None:
    """fp16 needs CUDA (and a GradScaler); bf16 works on CPU and CUDA."""
    if amp == "fp16" and device.type != "cuda":
        raise KdctlError("train.amp is 'fp16', which needs a CUDA device; use 'bf16' or 'off' on the CPU")


def autocast(amp: str, device: torch.device):
    """The autocast context of ``amp`` ("off" | "bf16" | "fp16") on ``device``."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA max allocated, or the CPU peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


def compile_module(module: torch.nn.Module) -> None:
    """``torch.compile`` ``module`` in place (its ``__call__`` runs the compiled graph; its
    parameters and state dict are unchanged, so checkpoints stay plain)."""
    module.compile()
