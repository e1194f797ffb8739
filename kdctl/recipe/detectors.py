"""The detector sections of a recipe (``model.student`` / ``model.teacher``): the settings every
family reads (:class:`DetectorConfig`), and one section per family with settings of its own,
keyed by ``head`` (:data:`FAMILY_SECTIONS`, the union :data:`DetectorSection`).

Adding a family with settings of its own is a subclass here (``head: Literal["name"]``, its fields
and ``section_tag``) and one :data:`FAMILY_SECTIONS` row: no field on the shared section and no
validator elsewhere. Its builders read the fields (``cfg.yolo.width``); nothing else does.
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from kdctl.recipe.catalog import families
from kdctl.recipe.section import Section


class VariantConfig(Section):
    """Architecture details in which published detectors differ from MMDetection's defaults
    (what kdctl trains). ``kdctl fetch`` sets them for converted torchvision / MMDetection teachers
    (see docs/fetch.md); every default keeps kdctl's own behaviour."""

    # "torchvision": torchvision's AnchorGenerator (integer anchor sizes, rounded base anchors,
    # grid step = padded image size // feature size) and BoxCoder (dw/dh clamped from above only)
    priors: Literal["mmdet", "torchvision"] = "mmdet"
    p6_from: Literal["auto", "c5", "p5"] = "auto"  # "auto": MMDetection's choice for the head
    relu_before_p7: bool | None = None  # None: MMDetection's choice for the head
    head_conv_bias: bool | None = None  # None: tower convs have a bias only without a norm
    fcos_norm_on_bbox: bool = False  # FCOS: relu(scale * x) in strides instead of exp(scale * x) px
    fcos_centerness_on_reg: bool = False  # FCOS: centerness on the reg tower instead of cls
    centerness_score: Literal["mul", "sqrt"] = "mul"  # "sqrt": sqrt(cls * ctr) ranks and thresholds (torchvision FCOS)
    backbone_style: Literal["pytorch", "caffe"] = "pytorch"  # caffe: stride on the bottleneck's first 1x1 conv
    bn_eps: float | None = Field(None, ge=0)  # None: timm's BatchNorm eps (1e-5)
    mean: list[float] | None = None  # input RGB mean in [0, 1]; None: the timm model's
    std: list[float] | None = None  # input RGB std in [0, 1]; None: the timm model's

    @field_validator("mean", "std")
    @classmethod
    def _three(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 3 or min(value) < 0):
            raise ValueError(f"expected 3 non-negative numbers (R, G, B), got {value}")
        return value


class DetectorConfig(Section):
    """A detector: timm backbone + neck + the head of one of kdctl's detector families (``head``:
    a key of :data:`kdctl.models.families.FAMILIES`), with the settings every family reads. A
    family with settings of its own has its own section, a subclass (:data:`FAMILY_SECTIONS`);
    this one is the section of the families without."""

    section_tag: ClassVar[str] = "dense"  # the tag of the detector-section union (DetectorSection)

    head: str = "gfl"
    backbone: str = "resnet50"
    pretrained: str | None = None  # local safetensors / .pth of backbone weights, or "timm"
    weights: str | None = None  # a kdctl checkpoint of the whole detector, loaded strictly
    # transfer initialisation: a kdctl checkpoint (file, run directory, export, `kdctl fetch`
    # conversion) or a `kdctl fetch` name; every tensor that fits loads, the rest stays fresh
    # (kdctl.engine.transfer). Its classifier rows follow init_class_map: "auto" by class name
    # (case and `_`/space ignored), "none" fresh, or {dataset class: checkpoint class}
    init_from: str | None = None
    init_class_map: Union[Literal["auto", "none"], dict[str, str]] = "auto"
    num_classes: int | None = Field(None, ge=1)  # None: taken from the dataset
    fpn_channels: int = Field(256, ge=8)
    feat_channels: int = Field(256, ge=8)
    stacked_convs: int = Field(4, ge=1, le=8)
    # "auto": the family's own default (``Family.norm``: GroupNorm for FCOS/ATSS/GFL, none for
    # RetinaNet, whose towers are plain convs with bias)
    norm: Literal["auto", "gn", "bn", "none"] = "auto"
    # "auto": the family's first ``Family.box_losses`` (RetinaNet L1 on deltas, FCOS IoU (-log),
    # ATSS/GFL GIoU); the others it lists ("giou" for RetinaNet and FCOS)
    box_loss: str = "auto"
    norm_eval: bool = True
    frozen_stages: int = Field(1, ge=-1, le=4)
    # Non-positive priors whose IoF with a crowd / difficult region is >= this are ignored (no
    # loss); -1 turns ignoring off, as every official MMDetection/CrossKD COCO config does
    # (``ignore_iof_thr=-1``; ATSS has none). The COCO recipes set -1; 0.5 is kdctl's default.
    ignore_iof_thr: float = Field(0.5, le=1.0)
    variant: VariantConfig = VariantConfig()

    @field_validator("head")
    @classmethod
    def _known_family(cls, name: str) -> str:
        known = families()
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown detector family {name!r}; {hint}use one of {', '.join(map(repr, known))}")
        if cls is DetectorConfig and name in FAMILY_SECTIONS:  # only code can get here: a recipe picks the section
            raise ValueError(f"head {name!r} has a section of its own: build it with detector_config(head={name!r}, ...)")
        return name

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        import timm  # only the registry is read; nothing is imported by name

        from kdctl.models import cspelan  # noqa: F401  registers kdctl's own cspelan_* backbones with timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `timm.list_models()`"
            raise ValueError(f"unknown timm backbone {name!r}{hint}")
        return name

    @field_validator("box_loss")
    @classmethod
    def _box_loss_fits_head(cls, value: str, info) -> str:
        head = info.data.get("head")
        if head is None:  # the head failed its own check
            return value
        allowed = ("auto", *families()[head].box_losses)
        if value not in allowed:
            raise ValueError(f"box_loss {value!r} does not apply to head {head!r}; use one of {', '.join(allowed)}")
        return value

    @field_validator("init_class_map", mode="before")
    @classmethod
    def _class_map_kind(cls, value):
        if isinstance(value, dict):  # YAML reads a class named 0 as an int: names are text
            named = lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # noqa: E731
            value = {named(k): named(v) for k, v in value.items()}
            bad = [f"{k!r}: {v!r}" for k, v in value.items() if not (isinstance(k, str) and isinstance(v, str))]
            if bad:
                raise ValueError(f"expected class names on both sides, got {bad[0]}")
        elif value not in ("auto", "none"):  # else pydantic names each union member
            raise ValueError(f"expected 'auto', 'none' or a mapping {{dataset class: checkpoint class}}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_source_of_weights(self) -> "DetectorConfig":
        if self.weights and self.init_from:
            raise ValueError("weights and init_from exclude each other: weights loads this exact model strictly, "
                             "init_from transfers what fits; keep one")
        return self

    @model_validator(mode="before")
    @classmethod
    def _settings_of_another_family(cls, data):
        """A key of another family's section (``center_sampling`` with a gfl head) is refused in
        one line naming the family it belongs to. Left at its default it is dropped: the stored
        recipes of kdctl 0.1.0 checkpoints hold every family's settings in every detector section."""
        if not isinstance(data, dict):
            return data
        head = data.get("head", "gfl")
        data = dict(data)
        for key in [k for k in data if k not in cls.model_fields]:
            owner = next((name for name, section in FAMILY_SECTIONS.items() if key in section.model_fields), None)
            if owner is None:
                continue  # an unknown key: pydantic's extra-field error, with "did you mean"
            if _is_default(FAMILY_SECTIONS[owner], key, data[key]):
                del data[key]
            else:
                raise ValueError(f"{key} applies to the {owner} head only, not {head!r}; remove it")
        return data

    def built_width(self, channels: int) -> int:
        """The width the built detector has for a recipe width (``fpn_channels`` /
        ``feat_channels``): the same here; a family section with a width multiplier scales it."""
        return channels


class FCOSDetectorConfig(DetectorConfig):
    """The fcos family's section (:mod:`kdctl.models.families.fcos`)."""

    section_tag: ClassVar[str] = "fcos"
    head: Literal["fcos"] = "fcos"
    # positives only inside the centre region (1.5 strides) of a box. None: kdctl's default, on;
    # the official CrossKD FCOS config leaves mmdet's ``center_sampling=False``.
    center_sampling: bool | None = None


class YoloConfig(Section):
    """The yolo family's settings (``model.*.yolo``; kdctl.models.families.yolo), refused with any
    other head. Sizes n / s / m: width 0.25 / 0.5 / 0.75, depth 0.33 / 0.33 / 0.67."""

    width: float = Field(1.0, gt=0, le=4)  # multiplies fpn_channels and feat_channels (rounded up to 8)
    depth: float = Field(1.0, gt=0, le=4)  # CSP bottlenecks per PAN block: round(3 * depth), at least 1
    # The defaults below are measured (BENCHMARKS.md "Peer parity"); the other values are the
    # family before that ablation.
    # PAN widths: "pyramid" w, 2w, 4w at P3-P5 (YOLOv4's PAN), "uniform" w everywhere (PANet's);
    # w = fpn_channels * width
    neck_widths: Literal["pyramid", "uniform"] = "pyramid"
    neck_block: Literal["csp", "elan"] = "elan"  # PAN fusion block: CSP, or CSP + ELAN aggregation
    # head conv init: "default" PyTorch's (kaiming-uniform), "normal" mmdet's normal(0, 0.01)
    head_init: Literal["normal", "default"] = "default"
    bn_momentum: float | None = Field(0.03, gt=0, le=1)  # neck and head BatchNorm; None: PyTorch's 0.1
    bn_eps: float | None = Field(1e-3, gt=0)  # None: PyTorch's 1e-5
    tal_alpha: float = Field(0.5, ge=0)  # task-aligned assigner (TOOD): metric score^alpha * IoU^beta
    tal_beta: float = Field(6.0, ge=0)
    tal_topk: int = Field(10, ge=1)  # positives per object
    cls_weight: float | None = Field(None, ge=0)  # loss weights; None: the family's 0.5 (BCE),
    box_weight: float | None = Field(None, ge=0)  # 7.5 (CIoU)
    dfl_weight: float | None = Field(None, ge=0)  # and 1.5 (DFL)


class YoloDetectorConfig(DetectorConfig):
    """The yolo family's section (:mod:`kdctl.models.families.yolo`): its settings under ``yolo``."""

    section_tag: ClassVar[str] = "yolo"
    head: Literal["yolo"] = "yolo"
    yolo: YoloConfig = YoloConfig()

    def built_width(self, channels: int) -> int:
        from kdctl.models.blocks import scaled_width  # torch: only when a pair's widths are compared

        return scaled_width(channels, self.yolo.width)


# head -> the section of a family with settings of its own; every other head is a DetectorConfig
FAMILY_SECTIONS: dict[str, type[DetectorConfig]] = {"fcos": FCOSDetectorConfig, "yolo": YoloDetectorConfig}
SECTION_TAGS: tuple[str, ...] = ("dense", *(s.section_tag for s in FAMILY_SECTIONS.values()))


def _is_default(section: type[DetectorConfig], key: str, value: Any) -> bool:
    default = section.model_fields[key].default
    if isinstance(default, Section):
        try:
            return type(default).model_validate(value) == default
        except ValueError:
            return False
    return value == default


def _section_of(value: Any) -> str:
    head = value.get("head", "gfl") if isinstance(value, dict) else getattr(value, "head", "gfl")
    section = FAMILY_SECTIONS.get(head) if isinstance(head, str) else None
    return section.section_tag if section else "dense"


# a detector section: the family's own, chosen by ``head`` (default gfl: the shared section)
DetectorSection = Annotated[
    Union[Annotated[DetectorConfig, Tag("dense")], Annotated[FCOSDetectorConfig, Tag("fcos")],
          Annotated[YoloDetectorConfig, Tag("yolo")]],
    Discriminator(_section_of),
]
_SECTION = TypeAdapter(DetectorSection)


def detector_config(**fields) -> DetectorConfig:
    """The detector section of ``fields`` (``head`` picks the family's section):
    ``detector_config(head="yolo", yolo={"width": 0.25})`` is a :class:`YoloDetectorConfig`."""
    return _SECTION.validate_python(fields)
