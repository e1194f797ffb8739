"""The one path from a kdctl file to a detector, and the one writer of the metadata that makes it.

Every kdctl detector file (a training checkpoint, ``kdctl fetch``'s conversions, an exported
safetensors, ONNX or TorchScript file) carries string metadata with at least
``format`` (:data:`FORMAT`), ``recipe`` (the resolved recipe YAML), ``model`` (which of the
recipe's detectors it is: ``student`` | ``teacher``), ``num_classes``, ``classes`` (one per
line) and ``kdctl_version`` (:func:`detector_meta`). The detector is rebuilt from that recipe
(:func:`detector_from`; :func:`build_stored_detector` for a checkpoint's weights, with
:func:`load_detector` on a device) and nothing in a file can name code to run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kdctl.artifact import FORMAT
from kdctl.artifact.checkpoint import load_checkpoint_weights, load_model_weights
from kdctl.errors import KdctlError, load_yaml
from kdctl.models.detector import build_detector
from kdctl.recipe import Recipe, validate_raw
from kdctl.version import __version__

def detector_meta(recipe: Recipe, which: str, classes: list[str], **extra: str) -> dict[str, str]:
    """The metadata every kdctl detector file starts from (see the module docstring); ``extra``:
    the writer's own keys (``step``; ``teacher``, ``source``, ... for a conversion; the export's)."""
    return {"format": FORMAT, "recipe": recipe.to_yaml(), "model": which, "num_classes": str(len(classes)),
            "classes": "\n".join(classes), "kdctl_version": __version__, **extra}


def stored_detector_config(checkpoint: str | Path, meta: dict[str, str]):
    """(the detector section, the recipe) that a kdctl checkpoint's metadata describes: its
    stored recipe's ``model.student`` or ``model.teacher`` (metadata ``model``), with
    ``pretrained`` and ``weights`` cleared (the checkpoint itself holds the weights)."""
    if "recipe" not in meta:
        raise KdctlError(f"{checkpoint}: checkpoint has no recipe in its metadata; it was not written by kdctl train")
    raw = load_yaml(meta["recipe"], f"{checkpoint} (stored recipe)", "stored recipe")
    if not isinstance(raw, dict):
        raise KdctlError(f"{checkpoint}: the recipe in its metadata is not a mapping (a damaged or tampered file)")
    recipe = validate_raw(raw, f"{checkpoint} (stored recipe)")
    which = meta.get("model", "student")  # `kdctl train --model teacher` stores "teacher"
    section = getattr(recipe.model, which, None) if which in ("student", "teacher") else None
    if section is None:
        raise KdctlError(f"{checkpoint}: metadata names model {which!r}, which its stored recipe lacks")
    return section.model_copy(update={"pretrained": None, "weights": None}), recipe


# prefixes under which a checkpoint may hold the detector's keys: its own state dict, or a
# Distiller's (``student.`` + the detector's keys, beside ``teacher.`` and the adapters)
PREFIXES = ("", "student.")


def detector_keys(own: list[str], state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split ``state`` into (the detector's tensors under its own names, the other keys, sorted).

    The detector's keys ``own`` are looked up under each prefix of :data:`PREFIXES`; the prefix
    that finds most of them wins. Missing keys are left for :func:`load_model_weights` to report."""
    prefix = max(PREFIXES, key=lambda p: sum(p + k in state for k in own))
    kept = {k: state[prefix + k] for k in own if prefix + k in state}
    used = {prefix + k for k in kept}
    return kept, sorted(k for k in state if k not in used)


def detector_from(source: str | Path, meta: dict[str, str], state: dict[str, torch.Tensor] | None = None):
    """(model, detector section, recipe, dropped keys): the detector that ``meta``'s stored recipe
    describes, fp32 on the CPU, with the weights of ``state`` loaded strictly from its own keys
    (anything else, a teacher or adapters, is dropped), or random weights when ``state`` is None
    (an exported graph's metadata: the detector's postprocess turns the graph's outputs into
    detections). ``source`` names the file in errors."""
    cfg, recipe = stored_detector_config(source, meta)
    classes = meta.get("num_classes", "0")
    if not classes.isdigit():
        raise KdctlError(f"{source}: metadata num_classes is {classes[:40]!r}, not a number (a damaged or tampered file)")
    model = build_detector(cfg, int(classes) or None)
    dropped: list[str] = []
    if state is not None:
        kept, dropped = detector_keys(list(model.state_dict()), state)
        load_model_weights(model, kept, str(source))
    return model, cfg, recipe, dropped


def build_stored_detector(checkpoint: str | Path):
    """(model, detector section, recipe, metadata, dropped keys) of a kdctl checkpoint (training
    or exported; a run directory means its ``last.safetensors``): :func:`detector_from` its
    metadata and weights."""
    state, meta = load_checkpoint_weights(Path(checkpoint))
    model, cfg, recipe, dropped = detector_from(checkpoint, meta, state)
    return model, cfg, recipe, meta, dropped


def load_detector(checkpoint: str | Path, *, device: torch.device | str = "cpu"):
    """(model in eval mode on ``device``, recipe, metadata) of a kdctl checkpoint
    (:func:`build_stored_detector`)."""
    model, _, recipe, meta, _ = build_stored_detector(checkpoint)
    return model.to(torch.device(device)).eval(), recipe, meta
