"""The built-in teacher registry: published COCO detectors that map onto kdctl's heads.

Every URL and COCO box AP below is copied from its publisher:

- torchvision: ``torchvision/models/detection/retinanet.py`` and ``fcos.py`` (the ``Weights``
  enums: ``url``, ``_metrics["COCO-val2017"]["box_map"]``, ``_file_size`` in MB);
- MMDetection: ``configs/{retinanet,atss,gfl,fcos}/metafile.yml`` (``Weights``, ``box AP``) and
  the configs they name (backbone style, input normalisation, head options, test_cfg).

Neither publisher gives a file's full SHA-256. Both put its first 8 hex digits in the file name
(torchvision ``...-eeacb38b.pth``: ``torch.hub``'s ``check_hash``; MMDetection
``..._20200130-c2398f9e.pth``: ``tools/model_converters/publish_model.py`` appends
``sha256sum[:8]``), so the registry stores no full hash (``sha256=None``) and downloads are
checked against that prefix (:attr:`Teacher.sha256_prefix`). Nothing here is invented: an entry
whose architecture kdctl cannot reproduce (deformable convs, R18, mixed-precision duplicates) is
left out rather than approximated.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from kdctl.errors import KdctlError

# COCO 2017's 80 categories in category-id order (1 .. 90 with 10 ids unused): the order of
# MMDetection's CocoDataset.CLASSES, of torchvision's _COCO_CATEGORIES without "__background__"
# and "N/A", and of kdctl's COCO / YOLO coco8 class indices.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
# COCO category id of each of the 80 classes: torchvision's detectors predict 91 labels indexed
# by category id (0 = background, unused ids = "N/A"); the converter keeps these rows.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")


@dataclass(frozen=True)
class Teacher:
    """One registry entry.

    ``detector``: the kdctl ``DetectorConfig`` fields (head, backbone, widths, ``variant``);
    ``eval``: ``EvalConfig`` fields reproducing the publisher's test settings (``nms_iou`` None: the
    family's own, ``Family.nms_iou``, which is what MMDetection's configs use); ``layout``: how the
    converter reads the state dict ("torchvision" / "mmdet"); ``sha256``: the full hash where the
    publisher gives it (none does today), else None and :attr:`sha256_prefix` applies.
    """

    name: str
    source: str  # "torchvision" | "mmdet"
    detector: dict
    eval: dict
    backbone_label: str  # as the publisher writes it, X-101-32x4d, ...
    schedule: str
    box_ap: float  # COCO val2017 box AP, as published
    url: str
    size_mb: float | None = None  # download size where the publisher states it
    sha256: str | None = None
    notes: str = ""
    classes: tuple[str, ...] = field(default=COCO_CLASSES, repr=False)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str | None:
        """The hash prefix the publisher put in the file name (8 hex digits), or None."""
        match = _HASH_IN_NAME.search(self.filename)
        return match.group(1) if match else None

    @property
    def head(self) -> str:
        return self.detector["head"]


def _tv(name: str, head: str, norm: str, variant: dict, *, ap: float, url: str, size: float, schedule: str, ev: dict,
        notes: str) -> Teacher:
    detector = {"head": head, "backbone": "resnet50", "num_classes": 80, "fpn_channels": 256, "feat_channels": 256,
                "stacked_convs": 4, "norm": norm, "variant": {"priors": "torchvision", "p6_from": "p5" if name != "retinanet_resnet50_fpn_v2" else "c5",
                                                "relu_before_p7": True, **variant}}
    return Teacher(name, "torchvision", detector, ev, "R-50", schedule, ap, url, size_mb=size, notes=notes)


# torchvision's builders (retinanet_resnet50_fpn, ..._v2, fcos_resnet50_fpn): LastLevelP6P7 takes
# P5 when its in/out widths are equal (v1, FCOS) and C5 for v2 (2048 -> 256); P7 always follows a
# ReLU. RetinaNet v1's COCO weights run FrozenBatchNorm2d with eps 0 (overwrite_eps(model, 0.0)).
# v1's head convs have biases and no norm; v2's and FCOS's towers use GroupNorm(32) (FCOS's
# convs keep their biases). Test settings are the model classes' defaults.
_TV_RETINA_EVAL = {"score_thr": 0.05, "nms_iou": 0.5, "topk_pre_nms": 1000, "max_per_image": 300}
TORCHVISION = [
    _tv("retinanet_resnet50_fpn", "retinanet", "none", {"bn_eps": 0.0, "head_conv_bias": True}, ap=36.4, size=130.267,
        url="https://download.pytorch.org/models/retinanet_resnet50_fpn_coco-eeacb38b.pth",
        schedule="26 epochs", ev=_TV_RETINA_EVAL, notes="torchvision RetinaNet v1: plain conv head, FrozenBN eps 0"),
    _tv("retinanet_resnet50_fpn_v2", "retinanet", "gn", {"head_conv_bias": False}, ap=41.5, size=146.037,
        url="https://download.pytorch.org/models/retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
        schedule="torchvision PR 5756", ev=_TV_RETINA_EVAL, notes="torchvision RetinaNet v2: GroupNorm head, P6 from C5"),
    _tv("fcos_resnet50_fpn", "fcos", "gn", {"head_conv_bias": True, "fcos_norm_on_bbox": True, "fcos_centerness_on_reg": True,
                                      "centerness_score": "sqrt"}, ap=39.2, size=123.608,
        url="https://download.pytorch.org/models/fcos_resnet50_fpn_coco-99b0c9b7.pth", schedule="26 epochs",
        ev={"score_thr": 0.2, "nms_iou": 0.6, "topk_pre_nms": 1000, "max_per_image": 100},
        notes="torchvision FCOS: no Scale (kdctl's is fixed at 1), centerness on reg, score sqrt(cls*ctr)"),
]

# MMDetection --------------------------------------------------------------------------------
_MM = "https://download.openmmlab.com/mmdetection/v2.0"
_MM_FCOS = "https://openmmlab.oss-cn-hangzhou.aliyuncs.com/mmdetection/v2.0/fcos"
_BACKBONES = {"R-50": "resnet50", "R-101": "resnet101", "X-101-32x4d": "resnext101_32x4d", "X-101-64x4d": "resnext101_64x4d"}
# caffe-style configs normalise BGR 0-255 pixels by a mean and std 1: in kdctl's RGB [0, 1] terms,
# mean / 255 (reversed to RGB) and std 1 / 255; the converter reverses conv1's input channels.
_CAFFE_D2 = {"backbone_style": "caffe", "mean": [123.675 / 255, 116.28 / 255, 103.53 / 255], "std": [1 / 255] * 3}
_CAFFE_D1 = {"backbone_style": "caffe", "mean": [122.7717 / 255, 115.9465 / 255, 102.9801 / 255], "std": [1 / 255] * 3}


def _mm(name: str, head: str, bb: str, ap: float, url: str, schedule: str, variant: dict | None = None,
        nms: float | None = None, notes: str = "") -> Teacher:
    detector = {"head": head, "backbone": _BACKBONES[bb], "num_classes": 80, "fpn_channels": 256, "feat_channels": 256,
                "stacked_convs": 4, "variant": dict(variant or {})}
    ev = {"score_thr": 0.05, "nms_iou": nms, "topk_pre_nms": 1000, "max_per_image": 100}
    return Teacher(name, "mmdet", detector, ev, bb + ("-caffe" if (variant or {}).get("backbone_style") == "caffe" else ""),
                   schedule, ap, url, notes=notes)


MMDET = [
    _mm("gfl_r50_fpn_1x_coco", "gfl", "R-50", 40.2, f"{_MM}/gfl/gfl_r50_fpn_1x_coco/gfl_r50_fpn_1x_coco_20200629_121244-25944287.pth", "1x"),
    _mm("gfl_r50_fpn_mstrain_2x_coco", "gfl", "R-50", 42.9,
        f"{_MM}/gfl/gfl_r50_fpn_mstrain_2x_coco/gfl_r50_fpn_mstrain_2x_coco_20200629_213802-37bb1edc.pth", "2x ms"),
    _mm("gfl_r101_fpn_mstrain_2x_coco", "gfl", "R-101", 44.7,
        f"{_MM}/gfl/gfl_r101_fpn_mstrain_2x_coco/gfl_r101_fpn_mstrain_2x_coco_20200629_200126-dd12f847.pth", "2x ms"),
    _mm("gfl_x101_32x4d_fpn_mstrain_2x_coco", "gfl", "X-101-32x4d", 45.9,
        f"{_MM}/gfl/gfl_x101_32x4d_fpn_mstrain_2x_coco/gfl_x101_32x4d_fpn_mstrain_2x_coco_20200630_102002-50c1ffdb.pth", "2x ms"),
    _mm("atss_r50_fpn_1x_coco", "atss", "R-50", 39.4, f"{_MM}/atss/atss_r50_fpn_1x_coco/atss_r50_fpn_1x_coco_20200209-985f7bd0.pth", "1x"),
    _mm("atss_r101_fpn_1x_coco", "atss", "R-101", 41.5, f"{_MM}/atss/atss_r101_fpn_1x_coco/atss_r101_fpn_1x_20200825-dfcadd6f.pth", "1x"),
    _mm("retinanet_r50_fpn_1x_coco", "retinanet", "R-50", 36.5,
        f"{_MM}/retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth", "1x"),
    _mm("retinanet_r50_fpn_2x_coco", "retinanet", "R-50", 37.4,
        f"{_MM}/retinanet/retinanet_r50_fpn_2x_coco/retinanet_r50_fpn_2x_coco_20200131-fdb43119.pth", "2x"),
    _mm("retinanet_r50_fpn_mstrain_3x_coco", "retinanet", "R-50", 39.5,
        f"{_MM}/retinanet/retinanet_r50_fpn_mstrain_3x_coco/retinanet_r50_fpn_mstrain_3x_coco_20210718_220633-88476508.pth", "3x ms"),
    _mm("retinanet_r50_caffe_fpn_1x_coco", "retinanet", "R-50", 36.3,
        f"{_MM}/retinanet/retinanet_r50_caffe_fpn_1x_coco/retinanet_r50_caffe_fpn_1x_coco_20200531-f11027c5.pth", "1x", _CAFFE_D2),
    _mm("retinanet_r101_fpn_1x_coco", "retinanet", "R-101", 38.5,
        f"{_MM}/retinanet/retinanet_r101_fpn_1x_coco/retinanet_r101_fpn_1x_coco_20200130-7a93545f.pth", "1x"),
    _mm("retinanet_r101_fpn_2x_coco", "retinanet", "R-101", 38.9,
        f"{_MM}/retinanet/retinanet_r101_fpn_2x_coco/retinanet_r101_fpn_2x_coco_20200131-5560aee8.pth", "2x"),
    _mm("retinanet_r101_fpn_mstrain_3x_coco", "retinanet", "R-101", 41.0,
        f"{_MM}/retinanet/retinanet_r101_fpn_mstrain_3x_coco/retinanet_r101_fpn_mstrain_3x_coco_20210720_214650-7ee888e0.pth", "3x ms"),
    _mm("retinanet_r101_caffe_fpn_1x_coco", "retinanet", "R-101", 38.5,
        f"{_MM}/retinanet/retinanet_r101_caffe_fpn_1x_coco/retinanet_r101_caffe_fpn_1x_coco_20200531-b428fa0f.pth", "1x", _CAFFE_D2),
    _mm("retinanet_x101_32x4d_fpn_1x_coco", "retinanet", "X-101-32x4d", 39.9,
        f"{_MM}/retinanet/retinanet_x101_32x4d_fpn_1x_coco/retinanet_x101_32x4d_fpn_1x_coco_20200130-5c8b7ec4.pth", "1x"),
    _mm("retinanet_x101_32x4d_fpn_2x_coco", "retinanet", "X-101-32x4d", 40.1,
        f"{_MM}/retinanet/retinanet_x101_32x4d_fpn_2x_coco/retinanet_x101_32x4d_fpn_2x_coco_20200131-237fc5e1.pth", "2x"),
    _mm("retinanet_x101_64x4d_fpn_1x_coco", "retinanet", "X-101-64x4d", 41.0,
        f"{_MM}/retinanet/retinanet_x101_64x4d_fpn_1x_coco/retinanet_x101_64x4d_fpn_1x_coco_20200130-366f5af1.pth", "1x"),
    _mm("retinanet_x101_64x4d_fpn_2x_coco", "retinanet", "X-101-64x4d", 40.8,
        f"{_MM}/retinanet/retinanet_x101_64x4d_fpn_2x_coco/retinanet_x101_64x4d_fpn_2x_coco_20200131-bca068ab.pth", "2x"),
    _mm("fcos_r50_caffe_fpn_gn-head_1x_coco", "fcos", "R-50", 36.6,
        f"{_MM_FCOS}/fcos_r50_caffe_fpn_gn-head_1x_coco/fcos_r50_caffe_fpn_gn-head_1x_coco-821213aa.pth", "1x", _CAFFE_D1),
    _mm("fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco", "fcos", "R-50", 38.7,
        f"{_MM_FCOS}/fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco/"
        "fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco-0a0d75a8.pth", "1x",
        {**_CAFFE_D2, "fcos_norm_on_bbox": True, "fcos_centerness_on_reg": True, "head_conv_bias": True}, nms=0.6,
        notes="FCOS tricks: norm_on_bbox, centerness_on_reg, conv_bias, NMS 0.6"),
    _mm("fcos_r101_caffe_fpn_gn-head_1x_coco", "fcos", "R-101", 39.1,
        f"{_MM_FCOS}/fcos_r101_caffe_fpn_gn-head_1x_coco/fcos_r101_caffe_fpn_gn-head_1x_coco-0e37b982.pth", "1x", _CAFFE_D1),
    _mm("fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco", "fcos", "R-50", 38.5,
        f"{_MM_FCOS}/fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco/fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco-d92ceeea.pth",
        "2x ms", _CAFFE_D1),
    _mm("fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco", "fcos", "R-101", 40.8,
        f"{_MM_FCOS}/fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco/fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco-511424d6.pth",
        "2x ms", _CAFFE_D1),
    _mm("fcos_x101_64x4d_fpn_gn-head_mstrain_640-800_2x_coco", "fcos", "X-101-64x4d", 42.6,
        f"{_MM_FCOS}/fcos_x101_64x4d_fpn_gn-head_mstrain_640-800_2x_coco/fcos_x101_64x4d_fpn_gn-head_mstrain_640-800_2x_coco-ede514a8.pth",
        "2x ms"),
]

TEACHERS: dict[str, Teacher] = {t.name: t for t in (*TORCHVISION, *MMDET)}


def get_teacher(name: str) -> Teacher:
    """The registry entry ``name``; KdctlError with a suggestion otherwise."""
    if name in TEACHERS:
        return TEACHERS[name]
    close = difflib.get_close_matches(name, list(TEACHERS), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise KdctlError(f"{name}: no such teacher in kdctl's registry; {hint}see `kdctl fetch --list`")


def teacher_for_url(url: str) -> Teacher | None:
    """The entry whose download URL (or file name) is ``url``'s, or None."""
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    for teacher in TEACHERS.values():
        if teacher.url == url or teacher.filename == tail:
            return teacher
    return None
