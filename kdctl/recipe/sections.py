"""The typed recipe tree: every section of a recipe, as pydantic models (:class:`Recipe` is the root).

A recipe is plain data. Components are chosen by name from kdctl's own tables (``Literal``
fields below, timm's model registry for backbones); nothing in a recipe can import a module
or run code. YAML is read with ``yaml.safe_load`` and ``--set`` values are parsed the same
way (never ``eval``), then the whole tree is validated by pydantic (:mod:`kdctl.recipe.load`).
"""
from __future__ import annotations

import typing
from typing import Annotated, Literal, Union

import yaml
from pydantic import BeforeValidator, Field, field_validator, model_validator

from kdctl.recipe.detectors import DetectorConfig, DetectorSection, VariantConfig, YoloConfig  # noqa: F401
from kdctl.recipe.pairs import pair_problem
from kdctl.recipe.section import Section, on_off  # noqa: F401


# ----------------------------------------------------------------------------- data
class ShapesConfig(Section):
    """The built-in procedural dataset (``kdctl.data.shapes``)."""

    train_images: int = Field(512, ge=1)
    val_images: int = Field(128, ge=1)
    image_size: int = Field(256, ge=64, le=2048)
    num_classes: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    min_objects: int = Field(2, ge=0)
    max_objects: int = Field(10, ge=1)


class AugmentConfig(Section):
    """``data.augment``: YOLO-style training augmentation (kdctl.data.augment): mosaic, random
    affine, HSV jitter, off for the last ``close_epochs`` epochs. The defaults are kdctl's choice
    for photos."""

    mosaic: float = Field(1.0, ge=0, le=1)  # probability that a sample is a 2x2 mosaic
    scale: tuple[float, float] = (0.5, 1.5)  # random scale range of the affine
    translate: float = Field(0.1, ge=0, le=0.5)  # shift, a fraction of the output side per axis
    degrees: float = Field(0.0, ge=0, le=45)  # rotation range (+-), degrees
    hsv_h: float = Field(0.015, ge=0, le=0.5)  # hue shift (+-), a fraction of the colour circle
    hsv_s: float = Field(0.6, ge=0, le=1)  # saturation gain in [1 - hsv_s, 1 + hsv_s]
    hsv_v: float = Field(0.3, ge=0, le=1)  # value gain in [1 - hsv_v, 1 + hsv_v]
    min_visible: float = Field(0.25, ge=0, le=1)  # a box keeps at least this share of its area
    close_epochs: int = Field(0, ge=0)  # plain samples for the last N epochs

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 4:
            raise ValueError(f"expected [low, high] with 0 < low <= high <= 4, got {list(value)}")
        return value


class DataConfig(Section):
    """Where the images and boxes come from and how they are resized and batched.

    Paths are relative to the working directory. ``path``: COCO JSON (train), YOLO
    ``data.yaml`` or VOC root folder. ``val_path``: COCO JSON for validation.
    """

    format: Literal["shapes", "coco", "yolo", "voc"] = "shapes"
    path: str | None = None
    val_path: str | None = None
    image_root: str | None = None
    val_image_root: str | None = None
    train_split: str | None = "train"
    val_split: str | None = "val"
    classes: list[str] | None = None  # VOC only: fixes the class list and order
    skip_bad: bool = False
    min_box_size: float = Field(1.0, ge=0)
    shapes: ShapesConfig = ShapesConfig()
    short_side: int = Field(800, ge=32)
    max_side: int = Field(1333, ge=32)
    hflip: float = Field(0.5, ge=0, le=1)
    pad_divisor: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(2, ge=0)
    # training augmentation; null (default): off. `augment: {}` or `--set data.augment=true`: the defaults
    augment: Annotated[AugmentConfig | None, BeforeValidator(on_off)] = None

    @model_validator(mode="after")
    def _needs_path(self) -> "DataConfig":
        if self.format != "shapes" and not self.path:
            raise ValueError(f"data.path is required when data.format is {self.format!r}: give the dataset's file or folder")
        return self


# ----------------------------------------------------------------------------- model
class ModelConfig(Section):
    student: DetectorSection = DetectorConfig()
    # the teacher of a distillation: a detector section with ``weights`` (a kdctl checkpoint),
    # or ``teacher_checkpoint`` alone: a kdctl checkpoint whose stored recipe says what it is
    teacher: DetectorSection | None = None
    teacher_checkpoint: str | None = None


# ----------------------------------------------------------------------------- distill
# Adapters are learnable 1x1 convs on the student's side, used in training only (they are not in
# the student's checkpoint). "auto": only where the student's and teacher's widths differ.
Adapter = Union[bool, Literal["auto"]]


class CrossKDLoss(Section):
    """CrossKD (Wang et al., CVPR 2024); see :mod:`kdctl.distill.crosskd`.

    ``reuse_idx`` None: the official configs' value (3; FCOS 2). ``cls_weight`` / ``reg_weight``
    None: the official configs' loss weights for the head. ``weight`` multiplies both.
    """

    type: Literal["crosskd"]
    weight: float = Field(1.0, ge=0)
    reuse_idx: int | None = Field(None, ge=0)
    cls_weight: float | None = Field(None, ge=0)
    reg_weight: float | None = Field(None, ge=0)
    temperature: float = Field(1.0, gt=0)  # GFL: softmax temperature of the distribution KL
    beta: float = Field(1.0, ge=0)  # KD quality focal loss exponent
    adapter: Adapter = "auto"


class SSIMLoss(Section):
    """SSIM structural feature distillation (de Rijk et al., NeurIPS 2022) on every FPN level."""

    type: Literal["ssim"]
    weight: float = Field(1.0, ge=0)
    window: int = Field(11, ge=3)
    sigma: float = Field(1.5, gt=0)
    alpha: float = Field(1.0, gt=0)  # luminance exponent
    beta: float = Field(1.0, gt=0)  # contrast exponent
    gamma: float = Field(1.0, gt=0)  # structure exponent
    adapter: Adapter = "auto"

    @field_validator("window")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"window must be odd, got {value}")
        return value


class FeatureLoss(Section):
    """FPN feature imitation baselines: PKD (Pearson correlation, Cao et al. 2022), L2, L1."""

    type: Literal["pkd", "feat_l2", "feat_l1"]
    weight: float = Field(1.0, ge=0)
    adapter: Adapter = "auto"


class MimicLoss(Section):
    """Direct prediction mimicking on the student's own head: the KD losses CrossKD uses, applied
    to the student's predictions instead of the cross-head ones (the comparison in Wang et al.)."""

    type: Literal["pred_mimic"]
    weight: float = Field(1.0, ge=0)
    cls_weight: float | None = Field(None, ge=0)
    reg_weight: float | None = Field(None, ge=0)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(1.0, ge=0)


DistillLoss = Annotated[Union[CrossKDLoss, SSIMLoss, FeatureLoss, MimicLoss], Field(discriminator="type")]


class DistillConfig(Section):
    """``losses``: the KD methods, combinable; empty trains the student alone (the baseline)."""

    losses: list[DistillLoss] = []
    # the frozen teacher's forward (under torch.inference_mode): "auto" = "off" = fp32, as the
    # official teacher (a bf16 teacher moved the KD-QFL losses by 1.5e-2 relative: BENCHMARKS.md);
    # "bf16" or "fp16" (CUDA) for speed
    teacher_amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # prediction methods (crosskd, pred_mimic) with a teacher trained on other classes: the teacher
    # class each dataset class mimics. "auto": the same name (case-insensitive, "_" = space); or
    # {dataset class: teacher class}, the classes it leaves out matched by name. Feature methods
    # work with any teacher and ignore it (kdctl.distill.class_map).
    class_map: Union[Literal["auto"], dict[str, str]] = "auto"

    @field_validator("losses")
    @classmethod
    def _once_each(cls, losses: list) -> list:
        seen = [item.type for item in losses]
        twice = sorted({t for t in seen if seen.count(t) > 1})
        if twice:
            raise ValueError(f"each method may appear once; {', '.join(twice)} appears more than once")
        return losses

    @field_validator("class_map", mode="before")
    @classmethod
    def _names_or_auto(cls, value):
        if value == "auto":
            return value
        if not isinstance(value, dict):  # else pydantic reports each member of the union
            raise ValueError(f"expected 'auto' or a mapping {{dataset class: teacher class}}, got {value!r}")
        # YAML reads a class named 1 as a number; class names are text
        value = {str(k) if isinstance(k, (int, float)) else k: str(v) if isinstance(v, (int, float)) else v
                 for k, v in value.items()}
        bad = [f"{k!r}: {v!r}" for k, v in value.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise ValueError(f"expected class names on both sides, got {bad[0]}")
        return value


# ----------------------------------------------------------------------------- train / eval / runtime
class EMAConfig(Section):
    """``train.ema``: an exponential moving average of the trained weights (kdctl.engine.ema),
    used for evaluation and saved as the checkpoints' weights. At the n-th applied optimizer step
    the decay is ``decay * (1 - exp(-n / tau))``; ``tau: 0`` uses ``decay`` from the start."""

    decay: float = Field(0.9998, ge=0, lt=1)
    tau: float = Field(2000.0, ge=0)  # steps of the warm-up ramp


class TrainConfig(Section):
    epochs: int = Field(12, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[int] = [8, 11]  # epochs at which the step schedule multiplies lr by gamma
    gamma: float = Field(0.1, gt=0)
    warmup_iters: int = Field(500, ge=0)
    warmup_ratio: float = Field(0.001, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    # distributed: SyncBatchNorm in the student (CUDA); "linear": lr * total batch / base_batch_size
    # (MMDetection's auto_scale_lr, base 16 = 8 GPUs x 2 images), "off": lr as written
    sync_bn: bool = False
    scale_lr: Literal["off", "linear"] = "off"
    base_batch_size: int = Field(16, ge=1)
    seed: int = 0
    deterministic: bool = False
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(0, ge=0)  # steps; 0 = only at epoch ends
    log_every: int = Field(20, ge=1)
    out_dir: str = "runs"
    # weight EMA; null (default): off. `ema: {}` or `--set train.ema=true`: decay 0.9998, tau 2000
    ema: Annotated[EMAConfig | None, BeforeValidator(on_off)] = None


class EvalConfig(Section):
    batch_size: int = Field(8, ge=1)
    score_thr: float = Field(0.05, ge=0, le=1)
    nms_iou: float | None = Field(None, gt=0, le=1)  # None: the head's MMDetection default
    topk_pre_nms: int = Field(1000, ge=1)
    max_per_image: int = Field(100, ge=1)
    per_class: bool = False


class RuntimeConfig(Section):
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    threads: int | None = Field(None, ge=1)
    compile: bool = False  # torch.compile the backbones and FPNs of student and teacher

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        base, _, idx = value.partition(":")
        if base not in ("auto", "cpu", "cuda", "mps") or (idx and not idx.isdigit()):
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
        return value


class Recipe(Section):
    """The whole recipe. It is what gets saved in run directories and checkpoints."""

    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _pair_can_distil(self) -> "Recipe":
        if self.model.teacher is not None and self.model.teacher_checkpoint is None and self.distill.losses:
            problem = pair_problem(self.model.student, self.model.teacher, self.distill.losses)
            if problem:
                raise ValueError(problem)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# the KD method names: the ``type`` literals of the DistillLoss sections (they exist only there)
METHOD_NAMES: tuple[str, ...] = tuple(
    name for section in typing.get_args(typing.get_args(DistillLoss)[0])
    for name in typing.get_args(section.model_fields["type"].annotation)
)
