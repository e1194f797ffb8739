"""torchvision RetinaNet (v1, v2) and FCOS state dicts -> kdctl ``Detector`` state dicts.

Key mapping (torchvision/models/detection/{retinanet,fcos}.py, backbone_utils.py,
ops/feature_pyramid_network.py; left: torchvision, right: kdctl):

=====================================================  ==========================================
``backbone.body.<timm/torchvision ResNet key>``         ``backbone.body.<same key>``
``backbone.fpn.inner_blocks.i[.0].{weight,bias}``       ``neck.lateral_convs.i.*`` (C3..C5)
``backbone.fpn.layer_blocks.i[.0].*``                   ``neck.output_convs.i.*``
``backbone.fpn.extra_blocks.p6.*`` / ``p7.*``           ``neck.extra_convs.0.*`` / ``1.*``
RetinaNet ``head.{classification,regression}_head``
  ``.conv.i.0.*`` (conv; old files: ``.conv.{2i}.*``)  ``head.{cls,reg}_tower.i.0.*``
  ``.conv.i.1.*`` (v2 GroupNorm)                       ``head.{cls,reg}_tower.i.1.*``
FCOS ``...conv.{3i}.*`` conv, ``conv.{3i+1}.*`` GN      ``head.{cls,reg}_tower.i.{0,1}.*``
``cls_logits`` / ``bbox_reg`` / ``bbox_ctrness``        ``cls_pred`` / ``reg_pred`` / ``centerness_pred``
=====================================================  ==========================================

torchvision's COCO models predict 91 labels indexed by COCO category id (0 background, 10 unused
"N/A" ids); the converter keeps the 80 real classes' rows of ``cls_logits`` (anchor-major:
row ``a * 91 + id``) so label ``i`` is the i-th COCO category. torchvision's FCOS has no
per-level ``Scale``: kdctl's FCOS head gets scales of exactly 1. Files saved from
FrozenBatchNorm2d have no ``num_batches_tracked``; the caller fills zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdctl.errors import KdctlError
from kdctl.hub.registry import COCO_CATEGORY_IDS, Teacher
from kdctl.models.families import get_family
from kdctl.models.priors import num_anchors as num_anchors_of


class _Taker:
    """Moves source keys to kdctl keys and remembers what was used, so that every key of the
    source file is accounted for (an unused key is an error naming it)."""

    def __init__(self, state: dict[str, Tensor], source: str):
        self.state, self.source = state, source
        self.out: dict[str, Tensor] = {}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, src: str, dst: str, value: Tensor | None = None) -> None:
        if src not in self.state:
            raise KdctlError(f"{self.source}: key {src!r} is missing; is this the checkpoint the name says?")
        self.used.add(src)
        self.out[dst] = self.state[src] if value is None else value

    def take_params(self, src_prefix: str, dst_prefix: str, names=("weight", "bias"), optional=("bias",)) -> None:
        for name in names:
            if name in optional and not self.has(src_prefix + name):
                continue
            self.take(src_prefix + name, dst_prefix + name)

    def finish(self, what: str) -> dict[str, Tensor]:
        unused = sorted(k for k in self.state if k not in self.used)
        if unused:
            more = f", ... {len(unused) - 5} more" if len(unused) > 5 else ""
            raise KdctlError(f"{self.source}: {len(unused)} key(s) of the {what} checkpoint map to nothing in kdctl "
                             f"({', '.join(unused[:5])}{more}); is it the model the name says?")
        return self.out


def _unwrap(obj, source: str) -> dict[str, Tensor]:
    """The state dict inside a torchvision file (a plain state dict, or a references/detection
    training checkpoint's ``model``)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise KdctlError(f"{source}: expected a torchvision state dict (parameter name -> tensor)")
    return obj


def select_coco_rows(weight: Tensor, num_anchors: int, source: str) -> Tensor:
    """``[A * C, ...]`` predictor rows -> ``[A * 80, ...]``: keep the 80 COCO category ids of each
    anchor's 91 labels (C = 91); C = 80 is returned unchanged."""
    rows = weight.shape[0]
    if rows % num_anchors:
        raise KdctlError(f"{source}: cls_logits has {rows} rows, not a multiple of {num_anchors} anchors")
    classes = rows // num_anchors
    if classes == len(COCO_CATEGORY_IDS):
        return weight
    if classes != 91:
        raise KdctlError(f"{source}: cls_logits predicts {classes} labels per anchor; kdctl converts torchvision's "
                         "COCO models (91 labels) or 80-class models")
    ids = torch.tensor(COCO_CATEGORY_IDS)
    index = (torch.arange(num_anchors)[:, None] * 91 + ids[None, :]).reshape(-1)
    return weight[index].clone()


def convert_torchvision(obj, teacher: Teacher, source: str) -> tuple[dict[str, Tensor], dict]:
    """(kdctl state dict, ``variant`` fields read off the file) for a torchvision RetinaNet / FCOS.

    ``obj`` is what ``torch.load(weights_only=True)`` returned; ``teacher`` says which head it is;
    ``source`` names the file in errors. Raises KdctlError naming the first missing or unused keys.
    """
    state = _unwrap(obj, source)
    t = _Taker(state, source)
    for key in state:
        if key.startswith("backbone.body."):
            t.take(key, key)
    for src_block, dst_block in (("inner_blocks", "lateral_convs"), ("layer_blocks", "output_convs")):
        for i in range(3):
            base = f"backbone.fpn.{src_block}.{i}."
            new = base + "0." if t.has(base + "0.weight") else base  # Conv2dNormActivation (new) or Conv2d (old)
            t.take_params(new, f"neck.{dst_block}.{i}.", optional=())
    t.take_params("backbone.fpn.extra_blocks.p6.", "neck.extra_convs.0.", optional=())
    t.take_params("backbone.fpn.extra_blocks.p7.", "neck.extra_convs.1.", optional=())
    fpn_width = state["backbone.fpn.layer_blocks.0.0.weight" if "backbone.fpn.layer_blocks.0.0.weight" in state
                      else "backbone.fpn.layer_blocks.0.weight"].shape[0]
    # LastLevelP6P7 uses P5 when its input width equals its output width, else C5
    variant = {"p6_from": "p5" if state["backbone.fpn.extra_blocks.p6.weight"].shape[1] == fpn_width else "c5"}
    head = teacher.head
    anchors = get_family(head).anchors
    num_anchors = 1 if anchors is None else num_anchors_of(anchors[1], anchors[2])
    norm = False
    for src, dst in (("classification_head", "cls_tower"), ("regression_head", "reg_tower")):
        prefix = f"head.{src}.conv."
        for i in range(4):
            if head == "fcos":  # nn.Sequential(conv, GroupNorm, ReLU) x 4
                conv, gn = f"{prefix}{3 * i}.", f"{prefix}{3 * i + 1}."
            elif t.has(f"{prefix}{i}.0.weight"):  # Conv2dNormActivation(conv, [norm], ReLU)
                conv, gn = f"{prefix}{i}.0.", f"{prefix}{i}.1."
            else:  # files from before Conv2dNormActivation: Sequential(conv, ReLU) x 4
                conv, gn = f"{prefix}{2 * i}.", None
            t.take_params(conv, f"head.{dst}.{i}.0.")
            if gn is not None and t.has(gn + "weight"):
                t.take_params(gn, f"head.{dst}.{i}.1.", optional=())
                norm = True
    cls_w = state["head.classification_head.cls_logits.weight"]
    t.take("head.classification_head.cls_logits.weight", "head.cls_pred.weight", select_coco_rows(cls_w, num_anchors, source))
    t.take("head.classification_head.cls_logits.bias", "head.cls_pred.bias",
           select_coco_rows(state["head.classification_head.cls_logits.bias"], num_anchors, source))
    t.take_params("head.regression_head.bbox_reg.", "head.reg_pred.", optional=())
    if head == "fcos":
        t.take_params("head.regression_head.bbox_ctrness.", "head.centerness_pred.", optional=())
        for level in range(5):  # no Scale in torchvision's FCOS: multiply by exactly 1
            t.out[f"head.scales.{level}.scale"] = torch.tensor(1.0)
    variant["head_conv_bias"] = "head.cls_tower.0.0.bias" in t.out
    out = t.finish("torchvision")
    return out, {"norm": "gn" if norm else "none", "variant": variant}
