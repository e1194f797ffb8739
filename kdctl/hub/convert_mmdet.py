"""MMDetection GFL / ATSS / RetinaNet / FCOS checkpoints -> kdctl ``Detector`` state dicts.

An MMDetection checkpoint is ``{"state_dict": ..., "meta": ...}``. Key mapping (names checked
against mmdet's ``backbones/resnet.py`` + ``resnext.py``, ``necks/fpn.py``, and the
``dense_heads`` ``retina_head.py``, ``atss_head.py``, ``gfl_head.py``, ``anchor_free_head.py`` +
``fcos_head.py``; mmcv's ``ConvModule`` names its parts ``conv`` and ``gn``/``bn``):

==============================================  ==================================================
``backbone.{conv1,bn1,layerN.*}``               ``backbone.body.<same>`` (timm ResNet/ResNeXt names)
``neck.lateral_convs.i.conv.*`` (i = 0..2)      ``neck.lateral_convs.i.*`` (start_level=1: C3..C5)
``neck.fpn_convs.i.conv.*`` (i = 0..2)          ``neck.output_convs.i.*``
``neck.fpn_convs.{3,4}.conv.*`` (extra convs)   ``neck.extra_convs.{0,1}.*``
``bbox_head.{cls,reg}_convs.i.conv.*``          ``head.{cls,reg}_tower.i.0.*``
``bbox_head.{cls,reg}_convs.i.{gn,bn}.*``       ``head.{cls,reg}_tower.i.1.*``
``retina_cls`` / ``atss_cls`` / ``gfl_cls`` /   ``head.cls_pred.*``
``conv_cls`` (early FCOS files: ``fcos_cls``)
``*_reg``                                       ``head.reg_pred.*``
``atss_centerness`` / ``conv_centerness``       ``head.centerness_pred.*``
``bbox_head.scales.i.scale``                    ``head.scales.i.scale``
``bbox_head.integral.project`` (GFL buffer)     checked to be ``0..reg_max``, not stored
==============================================  ==================================================

Caffe-style models read BGR images; kdctl feeds RGB, so conv1's input channels are reversed
(the registry gives the matching mean/std). Whether the tower convs carry biases and which norm
they use is read off the file. Any key left unmapped is an error naming it.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from kdctl.classes import class_key
from kdctl.errors import KdctlError
from kdctl.hub.convert_torchvision import _Taker
from kdctl.hub.registry import Teacher
from kdctl.models.families import get_family

def _unwrap(obj, source: str) -> tuple[dict[str, Tensor], dict]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], obj.get("meta") or {}
    else:
        state, meta = obj, {}
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise KdctlError(f"{source}: expected an MMDetection checkpoint ({{'state_dict': ..., 'meta': ...}})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return state, meta if isinstance(meta, dict) else {}


def _check_classes(meta: dict, teacher: Teacher, source: str) -> None:
    """mmdet v2 stores ``meta["CLASSES"]``, v3 ``meta["dataset_meta"]["classes"]``; when present
    they must be the registry's class list in the same order, compared by
    :func:`kdctl.classes.class_key` (``mmdet.evaluation.get_classes('coco')``, what its tools write
    into a checkpoint without names, spells ``traffic_light``)."""
    classes = meta.get("CLASSES")
    if classes is None and isinstance(meta.get("dataset_meta"), dict):
        classes = meta["dataset_meta"].get("classes")
    if classes is not None and [class_key(str(c)) for c in classes] != [class_key(c) for c in teacher.classes]:
        raise KdctlError(f"{source}: the checkpoint's classes ({len(classes)}: {', '.join(map(str, classes[:3]))}, ...) "
                         f"are not {teacher.name}'s COCO classes in order; convert it with a matching --as NAME")


# what a config fixes that identical state-dict keys cannot tell apart: (regex on the config text,
# what it means, the registry variant field and the value it implies)
_CONFIG_FEATURES = (
    (r"style\s*=\s*['\"]caffe['\"]", "style='caffe'", "backbone_style", "caffe", "pytorch"),
    (r"norm_on_bbox\s*=\s*True", "norm_on_bbox=True", "fcos_norm_on_bbox", True, False),
    (r"centerness_on_reg\s*=\s*True", "centerness_on_reg=True", "fcos_centerness_on_reg", True, False),
)


def _check_config(meta: dict, teacher: Teacher, source: str) -> None:
    """A file whose ``meta`` names its config must have been trained with ``teacher``'s: mmdet
    v2 writes the config file's name (``exp_name``) and text (``config``), MMEngine the text as
    ``cfg``. Keys are identical across FCOS plain / tricks and RetinaNet caffe / pytorch style,
    so without this a wrong ``--as`` converts silently and then normalises or decodes wrongly."""
    from kdctl.hub.registry import TEACHERS

    exp = meta.get("exp_name") or meta.get("experiment_name")
    if isinstance(exp, str):
        stem = Path(exp).name.removesuffix(".py")
        if stem in TEACHERS and stem != teacher.name:
            raise KdctlError(f"{source}: its metadata names the config {stem}, but it is being converted --as {teacher.name}; "
                             f"convert it --as {stem}")
    text = meta.get("config") if isinstance(meta.get("config"), str) else meta.get("cfg")
    if not isinstance(text, str) or teacher.detector.get("head") not in text.lower():
        return
    head = teacher.detector.get("head")
    feats = [f for f in _CONFIG_FEATURES if head == "fcos" or not f[2].startswith("fcos_")]
    found = {f[2]: re.search(f[0], text) is not None for f in feats}

    def fits(entry: Teacher) -> bool:
        v = entry.detector.get("variant", {})
        return all((v.get(f[2], f[4]) == f[3]) == found[f[2]] for f in feats)

    if fits(teacher):
        return
    bad = next(f for f in feats if (teacher.detector.get("variant", {}).get(f[2], f[4]) == f[3]) != found[f[2]])
    match = [t.name for t in TEACHERS.values() if t.source == "mmdet" and t.detector.get("head") == head
             and t.detector.get("backbone") == teacher.detector.get("backbone") and fits(t)]
    hint = f"convert it --as {match[0]}" if match else "convert it --as the registry entry of its own config (kdctl fetch --list)"
    raise KdctlError(f"{source}: its config {'sets' if found[bad[2]] else 'does not set'} {bad[1]}, unlike {teacher.name} "
                     f"(--as); {hint}")


def convert_mmdet(obj, teacher: Teacher, source: str) -> tuple[dict[str, Tensor], dict]:
    """(kdctl state dict, DetectorConfig fields read off the file) for an MMDetection checkpoint
    of ``teacher``'s head. Raises KdctlError naming the first missing or unused keys."""
    state, meta = _unwrap(obj, source)
    _check_classes(meta, teacher, source)
    _check_config(meta, teacher, source)
    t = _Taker(state, source)
    caffe = teacher.detector.get("variant", {}).get("backbone_style") == "caffe"
    for key, value in state.items():
        if key.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer")):
            if caffe and key == "backbone.conv1.weight":
                value = value.flip(1).contiguous()  # BGR -> RGB input channels
            t.take(key, "backbone.body." + key[len("backbone."):], value)
    for i in range(3):
        t.take_params(f"neck.lateral_convs.{i}.conv.", f"neck.lateral_convs.{i}.", optional=())
        t.take_params(f"neck.fpn_convs.{i}.conv.", f"neck.output_convs.{i}.", optional=())
    for i in range(2):
        t.take_params(f"neck.fpn_convs.{3 + i}.conv.", f"neck.extra_convs.{i}.", optional=())
    blocks = 0
    while t.has(f"bbox_head.cls_convs.{blocks}.conv.weight"):
        blocks += 1
    norm = "none"
    for src, dst in (("cls_convs", "cls_tower"), ("reg_convs", "reg_tower")):
        for i in range(blocks):
            base = f"bbox_head.{src}.{i}."
            t.take_params(base + "conv.", f"head.{dst}.{i}.0.")
            for kind in ("gn", "bn"):
                if t.has(base + kind + ".weight"):
                    names = ("weight", "bias") + (("running_mean", "running_var", "num_batches_tracked") if kind == "bn" else ())
                    t.take_params(base + kind + ".", f"head.{dst}.{i}.1.", names=names, optional=("num_batches_tracked",))
                    norm = kind
    predictors = get_family(teacher.head).mmdet_predictors
    if predictors is None:
        raise KdctlError(f"{source}: kdctl has no MMDetection conversion for {teacher.head!r} detectors")
    cls_names, reg_names, ctr_names = predictors
    for names, dst, required in ((cls_names, "cls_pred", True), (reg_names, "reg_pred", True), (ctr_names, "centerness_pred", bool(ctr_names))):
        found = next((n for n in names if t.has(f"bbox_head.{n}.weight")), None)
        if found is None and required:
            raise KdctlError(f"{source}: no bbox_head.{names[0]} in the checkpoint; is it a {teacher.head} model?")
        if found is not None:
            t.take_params(f"bbox_head.{found}.", f"head.{dst}.", optional=())
    level = 0
    while t.has(f"bbox_head.scales.{level}.scale"):
        t.take(f"bbox_head.scales.{level}.scale", f"head.scales.{level}.scale")
        level += 1
    if teacher.head == "gfl" and t.has("bbox_head.integral.project"):
        project = state["bbox_head.integral.project"]
        reg_max = state["bbox_head.gfl_reg.weight"].shape[0] // 4 - 1
        if not torch.allclose(project.float(), torch.arange(reg_max + 1, dtype=torch.float32)):
            raise KdctlError(f"{source}: bbox_head.integral.project is not 0..{reg_max}; kdctl's GFL integrates over 0..reg_max")
        t.used.add("bbox_head.integral.project")  # a constant kdctl computes itself
    out = t.finish("MMDetection")
    fields = {"stacked_convs": blocks, "norm": norm,
              "variant": {"head_conv_bias": f"head.cls_tower.0.0.bias" in out if norm != "none" else None}}
    return out, fields
