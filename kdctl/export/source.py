"""What an export starts from and what it writes as safetensors: the detector of a kdctl
checkpoint and nothing else.

A training checkpoint (``RUN/best.safetensors``) holds the detector's weights and the resolved
recipe in its metadata; ``NAME.state.pt`` (optimizer, adapters) beside it is never read here.
:func:`read_detector` builds the detector that the stored recipe describes and keeps only that
detector's own keys: anything else in the file (a teacher, CrossKD / feature-KD adapters, a
whole :class:`~kdctl.distill.distiller.Distiller` state dict whose student keys are prefixed
``student.``) is dropped and counted.

An exported safetensors file keeps the checkpoint format (``format: kdctl.detector/1``) so that
``kdctl eval`` and :func:`kdctl.load_detector` read it like a training checkpoint, with a recipe
trimmed to the one detector (no teacher, no distillation losses) and these extra metadata keys
(all strings): ``input_size`` (JSON ``[H, W]``, pixels), ``mean`` / ``std`` (JSON, RGB in 0..1),
``dtype`` (``float32`` | ``float16``), ``outputs`` (JSON list of the tensor-path output names),
``strides`` (JSON), ``postprocess`` (JSON: score_thr, nms_iou, topk_pre_nms, max_per_image),
``exported_from`` (the source file's name) and ``source_model`` (student | teacher).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from kdctl.artifact.checkpoint import resolve_checkpoint
from kdctl.artifact.stored import FORMAT, build_stored_detector, detector_meta
from kdctl.errors import KdctlError
from kdctl.models.contract import MetaArchitecture
from kdctl.recipe import DetectorConfig, DistillConfig, Recipe

@dataclass
class Source:
    """A detector read from a kdctl checkpoint.

    model: fp32, eval mode, on the requested device. ``dropped``: keys of the file that are not
    the detector's (teacher, adapters), sorted."""

    model: MetaArchitecture
    cfg: DetectorConfig
    recipe: Recipe
    meta: dict[str, str]
    file: Path
    classes: list[str]
    dropped: list[str] = field(default_factory=list)

    def postprocess_cfg(self) -> dict:
        """Keyword arguments of :func:`kdctl.models.postprocess.postprocess` from the recipe's
        ``eval`` section (``nms_iou`` None -> the head's default)."""
        e = self.recipe.eval
        nms = self.model.postprocess_rules["nms_iou"] if e.nms_iou is None else e.nms_iou
        return {"score_thr": e.score_thr, "nms_iou": nms, "topk_pre_nms": e.topk_pre_nms, "max_per_image": e.max_per_image}


def read_detector(path: str | Path, device: str | torch.device = "cpu") -> Source:
    """The detector of a kdctl checkpoint (training or exported), weights loaded strictly from
    its own keys (others dropped, see :func:`kdctl.artifact.stored.build_stored_detector`),
    fp32 (fp16 files are upcast), in eval mode on ``device``. KdctlError names the file when it
    is missing, not a kdctl checkpoint, or its weights do not fit the stored recipe."""
    file = resolve_checkpoint(path)
    model, cfg, recipe, meta, dropped = build_stored_detector(file)
    classes = meta["classes"].split("\n") if meta.get("classes") else [f"class_{i}" for i in range(model.num_classes)]
    return Source(model.to(torch.device(device)).eval(), cfg, recipe, meta, file, classes, dropped)


def dropped_summary(keys: list[str]) -> str:
    """``"5 (teacher.*: 3, crosskd.*: 2)"``: how many keys were dropped, by first name part."""
    groups: dict[str, int] = {}
    for k in keys:
        groups[k.split(".", 1)[0]] = groups.get(k.split(".", 1)[0], 0) + 1
    return f"{len(keys)} ({', '.join(f'{g}.*: {n}' for g, n in groups.items())})"


# ============================================================================= the tensor path
class TensorPath(nn.Module):
    """What ONNX and TorchScript export: normalised images -> the detector's raw head outputs.

    In: ``images`` float32 ``[B, 3, H, W]``, normalised as the checkpoint's eval pipeline does
    (see :func:`kdctl.export.verify.preprocess`). Out: a tuple of float32 tensors in the order of
    the detector's ``raw_names()``: ``cls_p*`` ``[B, A*K, H_l, W_l]`` logits, ``reg_p*``
    ``[B, A*R, H_l, W_l]`` (RetinaNet/ATSS deltas, FCOS distances, GFL distribution logits),
    ``centerness_p*`` ``[B, A, H_l, W_l]`` logits. Decoding and NMS stay outside (the one
    :func:`~kdctl.models.postprocess.postprocess` that eval uses; the detector's ``raw_from_tuple`` maps back).

    ``half``: the detector runs in float16 (a float16 copy is made); input and outputs stay
    float32, cast on entry and exit, so callers feed and read the same tensors either way.
    """

    def __init__(self, model: MetaArchitecture, half: bool = False):
        super().__init__()
        self.half = half
        self.detector = _half_copy(model) if half else model
        self.names = model.raw_names()

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.detector(images.half() if self.half else images)
        return tuple(t.float() for t in self.detector.raw_tuple(out))


def _half_copy(model: MetaArchitecture) -> MetaArchitecture:
    import copy

    return copy.deepcopy(model).half().eval()


# ============================================================================= exported metadata
def default_input_size(recipe: Recipe) -> tuple[int, int]:
    """(H, W) = (short_side, max_side) of the recipe's eval resize, each rounded up to a
    multiple of 32: a landscape image resized as ``kdctl eval`` does fits without scaling."""
    up = lambda v: int(math.ceil(v / 32) * 32)  # noqa: E731
    return up(recipe.data.short_side), up(recipe.data.max_side)


def exported_recipe(src: Source) -> Recipe:
    """The source recipe with the exported detector as ``model.student`` and no teacher or
    distillation parts (data, eval and train sections are kept: eval reads them)."""
    model = src.recipe.model.model_copy(update={"student": src.cfg, "teacher": None, "teacher_checkpoint": None})
    return src.recipe.model_copy(update={"model": model, "distill": DistillConfig()})


def export_meta(src: Source, input_size: tuple[int, int], half: bool) -> dict[str, str]:
    """String metadata of an exported artifact (see the module docstring); ONNX and TorchScript
    files carry the same keys."""
    m = src.model
    return detector_meta(
        exported_recipe(src), "student", src.classes,
        source_model=src.meta.get("model", "student"), input_size=json.dumps(list(input_size)),
        mean=json.dumps(list(m.mean)), std=json.dumps(list(m.std)), dtype="float16" if half else "float32",
        head=m.family.name, strides=json.dumps(list(m.strides)), outputs=json.dumps(m.raw_names()),
        postprocess=json.dumps(src.postprocess_cfg()), step=src.meta.get("step", ""), exported_from=src.file.name,
    )


def save_safetensors(model: MetaArchitecture, path: Path, meta: dict[str, str], half: bool) -> None:
    """Write the detector's own ``state_dict()`` (contiguous CPU copies; floating tensors as
    float16 with ``half``, integer buffers unchanged) with ``meta`` to ``path``."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        tensors[key] = t.half() if half and t.is_floating_point() else t
    save_file(tensors, str(path), metadata=meta)


def check_input_size(size: tuple[int, int] | None) -> None:
    """KdctlError unless both sides are positive multiples of 32 (the backbone's largest
    stride, and the eval pipeline's padding)."""
    if size is None:
        return
    bad = [v for v in size if v < 32 or v % 32]
    if bad:
        fix = max(32, int(math.ceil(bad[0] / 32) * 32))
        raise KdctlError(f"--input-size: {bad[0]} is not a positive multiple of 32 (the backbone's largest stride); use {fix}")
