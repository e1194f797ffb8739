"""Checkpoints in a run directory: weights as safetensors, training state beside them.

A checkpoint ``NAME`` (``last``, ``best``, ``step_000500``, ...) is two files:

- ``NAME.safetensors``: the model's ``state_dict()`` (contiguous CPU tensors) with string
  metadata (the resolved recipe YAML, kdctl version, step, ...). This is all that evaluation,
  export and fine-tuning read.
- ``NAME.state.pt``: what resuming needs besides the weights (optimizer, scheduler and
  GradScaler state, step, epoch, best AP, RNG states), written with ``torch.save`` and read with
  ``torch.load(weights_only=True)``, so it may hold only tensors and plain Python values.

Nothing a user loads can run code. Each file is written atomically (temporary file in the same
folder, fsync, ``os.replace``: :func:`kdctl.artifact.rundir.atomic_path`), so a crash leaves either
the old or the new file, never half of one. The pair is tied by a random ``save_id`` stored in both: the state file is written first and
the weights last, and a crash between the two leaves a pair whose ids differ, which
:func:`load_train_state` reports instead of resuming from mismatched halves.
"""
from __future__ import annotations

import contextlib
import pickle
import random
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from kdctl.artifact.rundir import atomic_path, atomic_write_bytes, recorded_writes  # noqa: F401 (re-exported)
from kdctl.errors import KdctlError

SAVE_ID = "save_id"  # key of the pairing id in the safetensors metadata and in the state dict


# ============================================================================= atomic files
# atomic_path / atomic_write_bytes live in kdctl.artifact.rundir (temporary-file hygiene) and are
# re-exported here, where callers have always found them


# ============================================================================= RNG state
def rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's (global) and torch's (CPU and every CUDA device's) RNGs,
    as tensors and plain Python values, so it survives ``torch.load(weights_only=True)``.

    Keys: ``python`` (version, 625 ints, gauss_next), ``numpy`` (MT19937 key as 624 ints, pos,
    has_gauss, cached_gaussian), ``torch`` (uint8 tensor), ``cuda`` (list of uint8 tensors, only
    when CUDA is available). ``np.random.Generator`` objects are not covered.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned. CUDA states are restored for the devices present
    (the first ``min(saved, visible)`` devices); a missing ``cuda`` entry leaves CUDA alone."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.to("cpu", torch.uint8), index)


# ============================================================================= saving
def _plain_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` as fresh, contiguous CPU tensors that share no memory (safetensors
    refuses tied or strided views). One copy per tensor."""
    out = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; safetensors stores tensors only")
        out[key] = value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
    return out


def save_checkpoint(run_dir: Path, name: str, model: nn.Module, train_state: dict[str, Any], meta: dict[str, str]) -> str:
    """Write ``run_dir/{name}.state.pt`` and then ``run_dir/{name}.safetensors``, each atomically.

    Args:
        run_dir: the run directory (must exist).
        name: checkpoint name without suffix (``last``, ``best``, ...).
        model: the module whose ``state_dict()`` is saved (unwrap DDP / compiled modules first).
        train_state: what resuming needs: tensors and plain Python values only (optimizer,
            scheduler, GradScaler ``state_dict()``s, step, epoch, best_ap, :func:`rng_state`).
            Saved with an added ``save_id`` key; the caller's dict is not changed.
        meta: string -> string metadata stored in the safetensors header (recipe YAML, version,
            step). The key ``save_id`` is reserved.

    Returns:
        The ``save_id`` written into both files.
    """
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"checkpoint metadata must map str to str; not so for {bad[:3]}")
    save_id = uuid.uuid4().hex
    with atomic_path(Path(run_dir) / f"{name}.state.pt") as tmp, recorded_writes(tmp) as handle:
        torch.save({**train_state, SAVE_ID: save_id}, handle)
    tensors = _plain_tensors(model)
    with atomic_path(Path(run_dir) / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={**meta, SAVE_ID: save_id})
    return save_id


# ============================================================================= loading
def resolve_checkpoint(path: str | Path) -> Path:
    """The ``.safetensors`` file meant by ``path``: a run directory means its
    ``last.safetensors``; a path without a suffix (``runs/x/best``) gets ``.safetensors``."""
    path = Path(path)
    if path.is_dir():
        return path / "last.safetensors"
    if not path.suffix and not path.exists():
        return path.with_suffix(".safetensors")
    return path


def load_checkpoint_weights(path: str | Path, *, tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a kdctl checkpoint's weights (CPU tensors) and its string metadata (``{}`` if none);
    ``tensors=False`` reads the header only (the weights come back empty).

    ``path`` is a ``.safetensors`` file, a run directory (its ``last.safetensors``) or a
    checkpoint path without suffix (``runs/x/best``). Raises KdctlError naming the file when it
    does not exist or is not a readable safetensors file.
    """
    file = resolve_checkpoint(path)
    if not file.is_file():
        shown = file if file == Path(path) else f"{path} ({file})"
        raise KdctlError(f"{shown}: no such checkpoint; give a run directory or a .safetensors file")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            meta = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KdctlError(f"{file}: is not a kdctl checkpoint (safetensors header unreadable): {reason}") from None
    return state, meta


def load_train_state(run_dir: Path, name: str, expect_save_id: str | None) -> dict[str, Any]:
    """Read ``run_dir/{name}.state.pt`` with ``torch.load(weights_only=True)`` onto the CPU.

    ``expect_save_id``: the ``save_id`` from ``{name}.safetensors``'s metadata; when given, a
    state file with another id (a save interrupted between the two files) is a KdctlError.
    Move optimizer state to the device by loading it into an optimizer built on that device.
    """
    path = Path(run_dir) / f"{name}.state.pt"
    if not path.is_file():
        raise KdctlError(f"{path}: no such training state; resuming needs {name}.state.pt beside {name}.safetensors "
                         f"(start a new run from the weights alone if it is lost)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = _load_failure(exc)
        raise KdctlError(f"{path}: is not a kdctl training state (unreadable with weights_only=True): {reason}") from None
    if not isinstance(state, dict):
        raise KdctlError(f"{path}: is not a kdctl training state (holds a {type(state).__name__}, not a dict)")
    if expect_save_id is not None and state.get(SAVE_ID) != expect_save_id:
        raise KdctlError(f"{path}: {name}.state.pt does not belong to {name}.safetensors (interrupted save?); "
                         f"resume from another checkpoint of the run, or start a new run from the weights alone")
    return state


# what every training state holds, and of which type (Trainer.save writes them)
TRAIN_STATE_KEYS = {"optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict, "step": int,
                    "best_ap": (int, float), "nonfinite": int, "history": list}


@contextlib.contextmanager
def restoring(path: Path):
    """Around restoring a training state read from ``path`` (:func:`load_train_state`): a state
    that lacks an entry, or holds one of another type or shape than the run has (a damaged or
    hand-edited file), is one KdctlError naming the file and the entry, not a KeyError."""
    try:
        yield
    except KeyError as exc:
        raise _damaged(path, f"no entry {exc}") from None
    except (TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise _damaged(path, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200], "or from another run") from None


def check_train_state(state: dict, path: Path) -> None:
    """Every entry of :data:`TRAIN_STATE_KEYS` is present and of its type (KdctlError naming
    ``path`` and the first one that is not)."""
    for key, kind in TRAIN_STATE_KEYS.items():
        value = state.get(key)
        if value is None:
            raise _damaged(path, f"no entry {key!r}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _damaged(path, f"entry {key!r} is a {type(value).__name__}")


def _damaged(path: Path, what: str, also: str = "") -> KdctlError:
    return KdctlError(f"{path}: the training state is damaged{' ' + also if also else ''} ({what}); resume from another "
                      "checkpoint of the run, or start a new run from the weights alone")


def _load_failure(exc: BaseException) -> str:
    """The useful clause of a ``torch.load`` failure: torch's weights_only message is a
    paragraph (advising ``weights_only=False``, which kdctl never does) around one reason."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n", 1)[0]
    text = " ".join(text.split()).split(". ", 1)[0]  # first sentence, on one line
    return text or type(exc).__name__


def load_model_weights(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly: every key present, none extra, shapes equal.

    Any misfit is one KdctlError naming ``source`` (the file) with the counts of missing,
    unexpected and reshaped keys and the first three of each. Dtypes are cast by
    ``load_state_dict`` as usual.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape (file vs model)", reshaped))
                if keys]
    if problems:
        raise KdctlError(f"{source}: weights do not fit the model: {'; '.join(problems)}; "
                         f"check that the recipe's model section matches the one the checkpoint was trained with")
    model.load_state_dict(state, strict=True)
