"""``kdctl fetch``: registry name / URL / local file -> a verified download -> a kdctl teacher
checkpoint that ``kdctl eval`` and ``kdctl distill --teacher`` read directly.

Cache layout (``$KDCTL_HOME``, default ``~/.cache/kdctl``)::

    downloads/<publisher's file name>        verified original files (.part while downloading)
    teachers/<name>.safetensors              converted kdctl checkpoints

A teacher checkpoint is a kdctl checkpoint: the detector's ``state_dict`` in safetensors, with
the resolved recipe in its metadata (the teacher as ``model.teacher``, metadata ``model`` =
"teacher", as ``kdctl train --model teacher`` writes), the COCO class names, and where it came
from (URL, SHA-256 of the original file, published AP).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from urllib.parse import urlsplit

import torch
from safetensors.torch import save_file

from kdctl.artifact.checkpoint import _load_failure, atomic_path, load_model_weights
from kdctl.artifact.stored import detector_meta
from kdctl.errors import KdctlError
from kdctl.hub.convert_mmdet import convert_mmdet
from kdctl.hub.convert_torchvision import convert_torchvision
from kdctl.hub.download import cache_home, check_hash, download, sha256_file
from kdctl.hub.registry import Teacher, get_teacher, teacher_for_url

CONVERTERS = {"torchvision": convert_torchvision, "mmdet": convert_mmdet}


def read_untrusted(path: Path):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only; a
    pickle that names any other callable is refused before it runs (KdctlError naming the file)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as exc:
        if _training_state(path):
            raise KdctlError(
                f"{path}: an MMEngine training checkpoint (optimizer and message_hub objects, which the safe loader "
                "refuses); keep only its weights first: MMDetection's tools/model_converters/publish_model.py IN OUT "
                "(it keeps state_dict and meta), then convert OUT") from None
        raise KdctlError(f"{path}: refused to load (torch.load weights_only=True: {_load_failure(exc)}); "
                         "only plain tensor checkpoints are read") from None


def _training_state(path: Path) -> bool:
    """The file names MMEngine's training-state classes (an ``epoch_N.pth`` / ``iter_N.pth``
    with ``message_hub``): read from the pickle's opcodes by torch, nothing is unpickled."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a readable torch zip file: no verdict, the caller's message stands
        return False
    return any(name.startswith("mmengine.") for name in names)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def teacher_recipe(teacher: Teacher, detector: dict):
    """The recipe stored in the checkpoint: the teacher as ``model.teacher``, the publisher's test
    settings as ``eval``, COCO at 800/1333 (the recipes/coco.yaml layout) as ``data``."""
    from kdctl.recipe import validate_raw

    raw = {
        "description": f"{teacher.name} ({teacher.source}, COCO box AP {teacher.box_ap}) converted by kdctl fetch",
        "data": {"format": "coco", "path": "data/coco/annotations/instances_train2017.json", "image_root": "data/coco/train2017",
                 "val_path": "data/coco/annotations/instances_val2017.json", "val_image_root": "data/coco/val2017",
                 "short_side": 800, "max_side": 1333},
        "model": {"teacher": detector},
        "eval": dict(teacher.eval),
    }
    return validate_raw(raw, f"registry entry {teacher.name}")


def convert_file(path: Path, teacher: Teacher, out: Path, *, source: str, sha256: str) -> dict:
    """Read ``path`` (weights_only), map its keys onto ``teacher``'s kdctl detector, check the
    result loads strictly, and write ``out`` (safetensors + recipe metadata) atomically."""
    from kdctl.models.detector import build_detector

    obj = read_untrusted(path)
    state, fields = CONVERTERS[teacher.source](obj, teacher, str(path))
    detector = _merge(teacher.detector, fields)
    recipe = teacher_recipe(teacher, detector)
    cfg = recipe.model.teacher
    model = build_detector(cfg)
    for key, value in model.state_dict().items():  # FrozenBatchNorm2d files lack the BN counters
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    load_model_weights(model, state, str(path))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = detector_meta(recipe, "teacher", list(teacher.classes), teacher=teacher.name, source=source,
                         source_sha256=sha256, box_ap=str(teacher.box_ap))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    params = sum(v.numel() for k, v in tensors.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    return {"params": params}


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def _checked_url(url: str) -> str:
    """``url`` when it is a well-formed http(s) URL with a host; KdctlError saying what is wrong."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise KdctlError(f"{url}: not a valid URL ({exc}); check it") from None
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise KdctlError(f"{url}: not a valid URL (it contains spaces or control characters); quote or encode them (%20)")
    if not parts.hostname:
        raise KdctlError(f"{url}: not a valid URL (no host); give http(s)://HOST/PATH")
    return url


def fetch(target: str | None = None, *, sha256: str | None = None, from_file: str | Path | None = None,
          as_name: str | None = None, force: bool = False, progress: bool = True, home: Path | None = None) -> dict:
    """Get a teacher into the cache and convert it; returns a summary dict (``name``, ``path``,
    ``cached`` (nothing to do), ``downloaded``, ``sha256``, ``checked``, ...).

    ``target``: a registry name or an http(s) URL (a registry file's URL, or any URL with
    ``sha256`` and ``as_name`` naming the registry entry of the same architecture).
    ``from_file``: a local file instead of a download (with ``as_name``). The file is checked
    against ``sha256`` if given, else the registry's hash (full, or the file-name prefix).
    """
    home = Path(home) if home is not None else cache_home()
    sha256 = sha256.lower() if sha256 else None
    if sha256 is not None and (len(sha256) < 8 or any(c not in "0123456789abcdef" for c in sha256)):
        raise KdctlError(f"--sha256 {sha256}: expected hex digits (the full 64, or at least the first 8)")
    url = None
    if from_file is not None:
        if target is not None:
            raise KdctlError("give NAME/URL or --from-file PATH, not both")
        if not as_name:
            raise KdctlError("--from-file needs --as NAME: the registry entry whose architecture the file holds (see `kdctl fetch --list`)")
        teacher = get_teacher(as_name)
    elif target is None:
        raise KdctlError("give a teacher NAME, a URL with --sha256, or --from-file PATH --as NAME (see `kdctl fetch --list`)")
    elif _is_url(target):
        url = _checked_url(target)
        teacher = get_teacher(as_name) if as_name else teacher_for_url(url)
        if teacher is None:
            raise KdctlError(f"{url}: no registry entry has this file; add --as NAME (the entry with the same architecture, "
                             "see `kdctl fetch --list`) and --sha256 HEX")
        if sha256 is None and teacher.url != url:
            raise KdctlError(f"{url}: not the registry's URL for {teacher.name}; pass --sha256 HEX of the file to trust it")
    else:
        teacher = get_teacher(target)
        url = teacher.url
    name = teacher.name
    out = home / "teachers" / f"{name}.safetensors"
    if out.exists() and not force:
        return {"name": name, "path": str(out), "cached": True, "downloaded": False, "source": teacher.source}
    full = sha256 if sha256 and len(sha256) == 64 else (None if sha256 else teacher.sha256)
    prefix = sha256 if sha256 and len(sha256) < 64 else (None if sha256 else teacher.sha256_prefix)
    info: dict = {"name": name, "path": str(out), "cached": False, "source": teacher.source}
    if from_file is not None:
        src = Path(from_file)
        if not src.is_file():
            raise KdctlError(f"{src}: no such file")
        actual = sha256_file(src)
        try:
            info["checked"] = check_hash(src, actual, full, prefix)
        except KdctlError as exc:
            raise KdctlError(f"{exc}; if it is another checkpoint of the same architecture, pass --sha256 {actual}") from None
        info.update(downloaded=False, sha256=actual, file=str(src))
        origin = str(src)
    else:
        filename = Path(urlsplit(url).path).name or f"{name}.pth"
        raw = home / "downloads" / filename
        if raw.exists() and not force:
            actual = sha256_file(raw)
            try:
                info["checked"] = check_hash(raw, actual, full, prefix)
                info.update(downloaded=False, sha256=actual, file=str(raw))
            except KdctlError:
                raw.unlink()  # a stale or damaged copy: fetch it again
        if "sha256" not in info:
            if force:
                raw.unlink(missing_ok=True)
            try:
                result = download(url, raw, sha256=full, sha256_prefix=prefix, progress=progress)
            except KdctlError as exc:  # name the entry in the offline / HTTP error's suggestion
                raise KdctlError(str(exc).replace("--as NAME", f"--as {name}")) from None
            info.update(downloaded=True, sha256=result["sha256"], checked=result["checked"], file=str(raw),
                        resumed_from=result["resumed_from"])
        src, origin = raw, url
    info.update(convert_file(src, teacher, out, source=origin, sha256=info["sha256"]))
    return info

