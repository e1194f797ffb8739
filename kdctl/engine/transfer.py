"""Transfer initialisation (``model.*.init_from``): start a detector from any kdctl checkpoint
whose architecture or classes differ from the recipe's.

Every checkpoint tensor whose name and shape fit the new model is loaded; the rest of the model
keeps its fresh initialisation, and checkpoint tensors the model lacks (another family's
predictors, a distiller's teacher and adapters) are ignored. The classifier
(``head.cls_pred``, ``A * K`` output channels, anchor-major: channel ``a * K + k``) is the
exception: its rows are per class, so they are copied class by class, for every anchor, from
the checkpoint class that ``init_class_map`` names for each dataset class ("auto": the same
name, ignoring case and ``_`` vs space; :mod:`kdctl.classes`). Dataset classes without a match keep the prior-
probability bias of a fresh head. When the two class lists are identical (same names, same
order) the classifier loads whole like any other tensor.

A checkpoint that hardly fits (under half of the model's parameters, classifier aside) is
refused with one line naming what differs: a silent "transfer" that loads only the FPN's
biases would look like a run that trains badly for no reason.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from torch import Tensor, nn

from kdctl.classes import map_classes, stored_class_names
from kdctl.artifact.checkpoint import load_checkpoint_weights, load_model_weights, resolve_checkpoint
from kdctl.artifact.stored import detector_keys, stored_detector_config
from kdctl.errors import KdctlError
from kdctl.models.detector import build_detector

MIN_FIT = 0.5  # fraction of the model's parameter elements (classifier aside) that must load


# ============================================================================= where the weights are
def resolve_init_from(spec: str) -> Path:
    """The ``.safetensors`` file that ``init_from: spec`` means.

    A path (a file, a run directory = its ``last.safetensors``, or a checkpoint path without
    suffix) wins; otherwise ``spec`` is a ``kdctl fetch`` registry name: the converted teacher
    ``$KDCTL_HOME/teachers/<spec>.safetensors`` when cached, else downloaded and converted now
    by :func:`kdctl.hub.fetch.fetch`. KdctlError (one line) when it is neither.
    """
    file = resolve_checkpoint(spec)
    if file.is_file() or _looks_like_path(spec):
        return file  # load_checkpoint_weights names a missing or unreadable file
    from kdctl.hub.download import cache_home

    cached = cache_home() / "teachers" / f"{spec}.safetensors"
    if cached.is_file():
        return cached
    from kdctl.hub.registry import TEACHERS

    if spec not in TEACHERS:
        close = difflib.get_close_matches(spec, list(TEACHERS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KdctlError(f"init_from {spec!r}: no such checkpoint file or run directory, nor a `kdctl fetch` name{hint}; "
                         "give a .safetensors file, a run directory or a name from `kdctl fetch --list`")
    from kdctl.hub.fetch import fetch

    return Path(fetch(spec)["path"])


def _looks_like_path(spec: str) -> bool:
    """True when ``spec`` cannot be a registry name (names have no folders and no suffix)."""
    return "/" in spec or "\\" in spec or spec.endswith(".safetensors") or Path(spec).exists()


def match_classes(dataset: list[str], checkpoint: list[str] | None, spec: str | dict[str, str],
                  source: str | Path) -> dict[int, int]:
    """Which checkpoint class initialises each dataset class: {dataset index k: checkpoint
    index j}, in dataset order; dataset classes left out keep a fresh classifier.

    ``spec`` is ``init_class_map``: "auto", "none" or {dataset class: checkpoint class} (the rest
    matched by name), the rule of :func:`kdctl.classes.map_classes` that ``distill.class_map``
    uses too. ``checkpoint`` None (no names in the file) maps nothing under "auto".
    KdctlError naming ``source`` for a bad mapping."""
    if checkpoint is None:
        if spec in ("auto", "none") or not spec:
            return {}
        raise KdctlError(f"{source}: the checkpoint lists no class names, so init_class_map cannot name them; "
                         "use init_class_map: none")
    try:
        return map_classes(dataset, checkpoint, spec, key="init_class_map", side="checkpoint", require_all=False)
    except KdctlError as exc:
        raise KdctlError(f"{source}: {exc}") from None


def copy_class_rows(mine: Tensor, theirs: Tensor, dst: Tensor, src: Tensor, rows: int) -> Tensor | None:
    """``mine`` with its rows ``dst`` replaced by ``theirs``'s rows ``src`` (cast to ``mine``'s
    dtype), or None when ``theirs`` does not fit (not ``rows`` rows, or another width or kernel).

    ``mine``: one of the model's per-class tensors (a dense head's ``cls_pred`` weight
    ``[A*K, C, kh, kw]`` or bias ``[A*K]``); ``theirs``: the checkpoint's, which should have
    ``rows`` rows (its ``A*K'``); ``dst`` / ``src``: the rows of the mapped classes on each side
    (the detector's ``class_rows``)."""
    if theirs.shape[0] != rows or theirs.shape[1:] != mine.shape[1:]:
        return None
    out = mine.detach().clone()
    if dst.numel():
        out[dst] = theirs[src].to(out.dtype)
    return out


def _class_tensors(model, own: dict[str, Tensor], kept: dict[str, Tensor], cls_keys: list[str],
                   pairs: dict[int, int], theirs: list[str] | None) -> dict[str, Tensor]:
    """{classifier key: the model's tensor with the mapped rows copied} for weight and bias
    together, or {} when the checkpoint's classifier does not fit (or its classes are unknown):
    rows are never half copied. The rows come from the detector's class-row surgery
    (``class_rows``), never from its layout."""
    if theirs is None or any(k not in kept for k in cls_keys):
        return {}
    dst, src = model.class_rows(list(pairs.keys())), model.class_rows(list(pairs.values()), len(theirs))
    rows = model.class_rows(range(len(theirs)), len(theirs)).numel()
    out = {k: copy_class_rows(own[k], kept[k], dst, src, rows) for k in cls_keys}
    return {} if any(t is None for t in out.values()) else out


# ============================================================================= loading
def init_from_checkpoint(model: nn.Module, cfg, classes: list[str]) -> dict:
    """Load what fits of ``cfg.init_from`` into ``model`` (built from ``cfg`` for ``classes``).

    ``cfg`` is the recipe's :class:`~kdctl.recipe.DetectorConfig` (``init_from``,
    ``init_class_map``, and ``head`` / ``backbone`` for the error message). Returns the
    JSON-ready report::

        {"source": resolved file, "loaded": n, "reinitialised": n, "ignored": n,
         "first_loaded": [3 names], "first_reinitialised": [5], "first_ignored": [5],
         "class_rows": {"mapped": n, "of": K, "map": {dataset class: checkpoint class}}}

    Counts are tensors: ``loaded`` + ``reinitialised`` = the model's state-dict entries (a
    classifier tensor counts as loaded only when every class row came from the checkpoint);
    ``ignored``: checkpoint tensors the model lacks. ``class_rows`` is absent when the
    classifier loaded whole (identical class lists). KdctlError naming the file when under
    :data:`MIN_FIT` of the parameters (classifier aside) fit, or for a bad ``init_class_map``.
    """
    file = resolve_init_from(cfg.init_from)
    try:
        state, meta = load_checkpoint_weights(file)
    except KdctlError as exc:  # say which recipe key named the file
        raise KdctlError(f"init_from: {exc}") from None
    own = model.state_dict()
    kept, ignored = detector_keys(list(own), state)
    theirs_classes = stored_class_names(meta, str(file))
    cls_keys = model.classifier_keys()
    whole = cfg.init_class_map == "auto" and theirs_classes == list(classes)
    pairs = {} if whole else match_classes(list(classes), theirs_classes, cfg.init_class_map, file)

    rows = {} if whole else _class_tensors(model, own, kept, cls_keys, pairs, theirs_classes)
    load = {k: t for k, t in rows.items() if pairs}
    reshaped: list[str] = []
    absent: list[str] = []
    for key, mine in own.items():
        theirs = kept.get(key)
        if key in cls_keys and not whole:
            continue
        if theirs is None:
            absent.append(key)
        elif theirs.shape == mine.shape:
            load[key] = theirs
        else:
            reshaped.append(f"{key} {list(theirs.shape)} vs {list(mine.shape)}")

    _check_fit(model, cfg, load, cls_keys, reshaped + [f"{k} absent" for k in absent], file, meta)
    model.load_state_dict(load, strict=False)
    all_rows = bool(rows) and len(pairs) == len(classes)
    loaded = [k for k in own if k in load and (k not in cls_keys or whole or all_rows)]
    reinit = [k for k in own if k not in loaded]
    report = {"source": str(file), "loaded": len(loaded), "reinitialised": len(reinit), "ignored": len(ignored),
              "first_loaded": loaded[:3], "first_reinitialised": reinit[:5], "first_ignored": ignored[:5]}
    if not (whole and all(k in load for k in cls_keys)):
        applied = pairs if rows else {}
        report["class_rows"] = {"mapped": len(applied), "of": len(classes),
                                "map": {classes[k]: theirs_classes[j] for k, j in applied.items()}}
    return report


def _check_fit(model: nn.Module, cfg, load: dict[str, Tensor], cls_keys: list[str], misfits: list[str],
               file: Path, meta: dict[str, str]) -> None:
    """KdctlError (one line, naming ``file``) when under :data:`MIN_FIT` of the model's parameter
    elements, classifier aside, are in ``load``: says the checkpoint's family and backbone
    against the recipe's and the first ``misfits`` (reshaped keys with both shapes first)."""
    params = {k: p.numel() for k, p in model.named_parameters() if k not in cls_keys}
    total = sum(params.values())
    fitted = sum(n for k, n in params.items() if k in load)
    if total == 0 or fitted >= MIN_FIT * total:
        return
    try:
        stored, _ = stored_detector_config(file, meta)
        what = f"the checkpoint is {stored.head} on {stored.backbone}"
    except KdctlError:
        what = "the checkpoint holds no readable recipe"
    raise KdctlError(f"{file}: init_from: almost nothing fits ({100 * fitted / total:.0f}% of the model's parameters): "
                     f"{what}, the recipe {cfg.head} on {cfg.backbone}; first misfits (file vs model): "
                     f"{', '.join(misfits[:3])}; init from a checkpoint of the same family and backbone, "
                     "or load backbone weights alone with `pretrained`")


def build_with_weights(cfg, classes: list[str], *, transfer: bool = True) -> tuple[nn.Module, dict | None]:
    """:func:`kdctl.models.detector.build_detector` of a recipe's detector section for a dataset
    with ``classes`` (K = ``len(classes)``), then either ``cfg.weights`` (a kdctl checkpoint of
    the whole detector) loaded strictly, or ``cfg.init_from`` transferred: what fits loads, class
    rows by name (:func:`init_from_checkpoint`). Returns (model, the
    transfer's JSON-ready report, or None without ``init_from``). ``transfer=False`` skips
    ``init_from`` (a resumed run: its own checkpoint replaces the weights anyway, and the file
    ``init_from`` named may be gone)."""
    model = build_detector(cfg, len(classes))
    if cfg.weights:
        state, _ = load_checkpoint_weights(cfg.weights)
        load_model_weights(model, state, str(cfg.weights))
    elif transfer and getattr(cfg, "init_from", None):
        return model, init_from_checkpoint(model, cfg, classes)
    return model, None
