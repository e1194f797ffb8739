"""Conversion of published detectors into kdctl detectors.

torchvision: its RetinaNet v1/v2 and FCOS builders with random weights (random BN statistics,
GroupNorm affines and head weights large enough to exercise the box-delta clamps) are converted,
and kdctl's detector must give the same FPN features, head outputs and final detections on the
same normalised tensor as torchvision's own modules and postprocess. The input (224 x 288) does
not divide by 128, so torchvision's AnchorGenerator grid steps on P6/P7 (image // grid) differ
from the nominal strides and are checked too.

MMDetection: state dicts named exactly as mmdet's ResNet / FPN / dense heads name their
parameters (written out here by hand, not by the converter) must land on the right kdctl
parameters; unmapped, missing and misshaped keys are errors naming them.
"""
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models import _meta
from torchvision.models.detection.image_list import ImageList

from kdctl.artifact.checkpoint import load_model_weights
from kdctl.errors import KdctlError
from kdctl.hub.convert_mmdet import convert_mmdet
from kdctl.hub.convert_torchvision import convert_torchvision
from kdctl.hub.fetch import _merge
from kdctl.hub.registry import COCO_CATEGORY_IDS, COCO_CLASSES, TEACHERS, Teacher, get_teacher
from kdctl.models.backbone import Backbone
from kdctl.models.detector import build_detector
from kdctl.recipe import detector_config

H, W = 224, 288


def test_coco_classes_match_torchvision():
    cats = _meta._COCO_CATEGORIES
    real = [(i, c) for i, c in enumerate(cats) if c not in ("__background__", "N/A")]
    assert tuple(c for _, c in real) == COCO_CLASSES
    assert tuple(i for i, _ in real) == COCO_CATEGORY_IDS


def test_registry_entries_are_complete():
    for t in TEACHERS.values():
        assert t.url.startswith("https://") and t.url.endswith(".pth"), t.name
        assert t.sha256 is None and len(t.sha256_prefix) == 8, t.name  # only the name's prefix is published
        assert 30 < t.box_ap < 50 and len(t.classes) == 80
        cfg = detector_config(**t.detector)  # validates head, timm backbone, variant
        assert cfg.num_classes == 80 and cfg.head in ("gfl", "atss", "retinanet", "fcos")
        if cfg.variant.backbone_style == "caffe":
            assert cfg.variant.std == [1 / 255] * 3
    assert {"torchvision", "mmdet"} == {t.source for t in TEACHERS.values()}
    assert {t.head for t in TEACHERS.values() if t.source == "mmdet"} == {"gfl", "atss", "retinanet", "fcos"}


def _randomise(model: torch.nn.Module, arch: str) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.0, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                if arch == "retinanet_resnet50_fpn":
                    m.eps = 0.0  # as torchvision's COCO v1 weights (overwrite_eps(model, 0.0))
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        head = model.head
        for conv in (m for m in head.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.normal_(0, 0.03, generator=g)
            if conv.bias is not None:
                conv.bias.normal_(0, 0.1, generator=g)
        cls = head.classification_head.cls_logits
        cls.bias.normal_(-2.0, 1.0, generator=g)  # some scores above the thresholds
        head.regression_head.bbox_reg.weight.normal_(0, 0.05, generator=g)  # |dw| > log(1000/16) at some anchors
        # background and N/A labels: never detected (kdctl keeps only the 80 classes)
        dropped = torch.tensor([c for c in range(91) if c not in COCO_CATEGORY_IDS])
        rows = (torch.arange(cls.bias.numel() // 91)[:, None] * 91 + dropped[None]).reshape(-1)
        cls.bias[rows] = -30.0
        cls.weight[rows] = 0.0


def _canonical(boxes, scores, labels):
    """Detections sorted by score, then box, then label (equal scores may come in any order)."""
    b, s, lab = boxes.numpy(), scores.numpy(), labels.numpy()
    order = np.lexsort((lab, b[:, 3], b[:, 2], b[:, 1], b[:, 0], -s))
    return b[order], s[order], lab[order]


@pytest.mark.parametrize("arch", ["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"])
@torch.no_grad()
def test_torchvision_conversion_gives_the_same_outputs_and_detections(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models.detection, arch)(weights=None, weights_backbone=None).eval()
    _randomise(tv, arch)
    teacher = TEACHERS[arch]
    state, fields = convert_torchvision(tv.state_dict(), teacher, arch)
    model = build_detector(detector_config(**_merge(teacher.detector, fields)))
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.zeros_like(value))
    load_model_weights(model, state, arch)
    model.eval()

    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(2))
    tv_feats = list(tv.backbone(x).values())
    kd_feats = model.features(x)
    for a, b in zip(tv_feats, kd_feats, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4
    tv_out = tv.head(tv_feats)
    flat = model.flat_outputs(model.head(kd_feats))
    ids = torch.tensor(COCO_CATEGORY_IDS)
    assert (tv_out["cls_logits"][..., ids] - flat["cls"]).abs().max() <= 1e-4
    assert (tv_out["bbox_regression"] - flat["reg"]).abs().max() <= 1e-4
    if arch == "fcos_resnet50_fpn":
        assert (tv_out["bbox_ctrness"] - flat["centerness"]).abs().max() <= 1e-4

    # priors: torchvision's anchors (grid step 224 // 4 = 56 and 288 // 5 = 57 on P6, 224 // 2 = 112 on P7)
    anchors = tv.anchor_generator(ImageList(x, [(H, W)]), tv_feats)[0]
    pri = model.priors(model.head(kd_feats))
    if pri.anchors is not None:
        assert torch.equal(anchors, pri.anchors)
    assert torch.equal((anchors[:, :2] + anchors[:, 2:]) / 2, pri.points)

    per_level = [f.shape[2] * f.shape[3] * (9 if "retinanet" in arch else 1) for f in tv_feats]
    split = {k: list(v.split(per_level, dim=1)) for k, v in tv_out.items()}
    ref = tv.postprocess_detections(split, [list(anchors.split(per_level))], [(H, W)])[0]
    ev = teacher.eval
    dets = model.predict(x, torch.tensor([[H, W]]), torch.ones(1, 2), score_thr=ev["score_thr"], nms_iou=ev["nms_iou"],
                         topk_pre_nms=ev["topk_pre_nms"], max_per_image=ev["max_per_image"])
    assert len(ref["boxes"]) == len(dets.boxes) >= 50
    rb, rs, rl = _canonical(ref["boxes"], ref["scores"], ref["labels"])
    kb, ks, kl = _canonical(dets.boxes, dets.scores, ids[dets.labels])
    np.testing.assert_allclose(kb, rb, atol=1e-3)
    np.testing.assert_allclose(ks, rs, atol=1e-6)
    np.testing.assert_array_equal(kl, rl)


# ----------------------------------------------------------------------------- MMDetection
def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def mmdet_layout(head: str, width: int = 32, blocks: int = 2, with_bias: bool = False) -> dict[str, tuple]:
    """Key -> shape of an MMDetection ResNet-18 + FPN(start_level=1, num_outs=5) + ``head``
    detector for 80 classes, as mmdet names them (ResNet/BasicBlock, ConvModule conv/gn)."""
    keys = {"backbone.conv1.weight": (64, 3, 7, 7), **_bn("backbone.bn1", 64)}
    cin = 64
    for layer, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"backbone.layer{layer}.{b}"
            keys[f"{p}.conv1.weight"] = (c, cin if b == 0 else c, 3, 3)
            keys.update(_bn(f"{p}.bn1", c))
            keys[f"{p}.conv2.weight"] = (c, c, 3, 3)
            keys.update(_bn(f"{p}.bn2", c))
            if b == 0 and layer > 1:
                keys[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", c))
        cin = c
    for i, c in enumerate((128, 256, 512)):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (width, c, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (width,)
    for i in range(5):  # fpn_convs.3 is P6's extra conv: on C5 (RetinaNet, 'on_input') or P5
        cin = 512 if (i == 3 and head == "retinanet") else width
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (width, cin, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (width,)
    gn = head != "retinanet"
    for branch in ("cls_convs", "reg_convs"):
        for i in range(blocks):
            keys[f"bbox_head.{branch}.{i}.conv.weight"] = (width, width, 3, 3)
            if not gn or with_bias:
                keys[f"bbox_head.{branch}.{i}.conv.bias"] = (width,)
            if gn:
                keys[f"bbox_head.{branch}.{i}.gn.weight"] = (width,)
                keys[f"bbox_head.{branch}.{i}.gn.bias"] = (width,)
    a = 9 if head == "retinanet" else 1
    reg = {"gfl": 4 * 17}.get(head, 4 * a)
    names = {"retinanet": ("retina_cls", "retina_reg", None), "atss": ("atss_cls", "atss_reg", "atss_centerness"),
             "gfl": ("gfl_cls", "gfl_reg", None), "fcos": ("conv_cls", "conv_reg", "conv_centerness")}[head]
    for name, out in zip(names, (80 * a, reg, a)):
        if name:
            keys[f"bbox_head.{name}.weight"] = (out, width, 3, 3)
            keys[f"bbox_head.{name}.bias"] = (out,)
    if head != "retinanet":
        keys.update({f"bbox_head.scales.{i}.scale": () for i in range(5)})
    if head == "gfl":
        keys["bbox_head.integral.project"] = (17,)
    return keys


def mmdet_checkpoint(head: str, seed: int = 0, **kw) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in mmdet_layout(head, **kw).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("integral.project"):
            state[key] = torch.linspace(0, 16, 17)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 4:  # conv weights: He-like scale, so the detector's outputs stay finite
            state[key] = torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        elif key.endswith(("bn1.weight", "bn2.weight", "downsample.1.weight", "gn.weight")):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return {"state_dict": state, "meta": {"CLASSES": COCO_CLASSES, "epoch": 12}}


def tiny_teacher(head: str, variant: dict | None = None, name: str | None = None, url: str = "https://example.invalid/x-0123abcd.pth") -> Teacher:
    detector = {"head": head, "backbone": "resnet18", "num_classes": 80, "fpn_channels": 32, "feat_channels": 32,
                "stacked_convs": 2, "variant": dict(variant or {})}
    return Teacher(name or f"tiny-{head}", "mmdet", detector, {"score_thr": 0.05, "nms_iou": 0.6, "topk_pre_nms": 1000,
                                                                "max_per_image": 100}, "R-18", "1x", 40.0, url)


def _load(teacher: Teacher, ckpt: dict):
    state, fields = convert_mmdet(ckpt, teacher, "ckpt.pth")
    model = build_detector(detector_config(**_merge(teacher.detector, fields)))
    load_model_weights(model, state, "ckpt.pth")  # strict: every kdctl key, nothing extra, same shapes
    return model, model.state_dict()


@pytest.mark.parametrize("head", ["gfl", "atss", "retinanet", "fcos"])
def test_mmdet_keys_land_on_the_right_parameters(head):
    ckpt = mmdet_checkpoint(head)
    src = ckpt["state_dict"]
    model, got = _load(tiny_teacher(head), ckpt)
    pairs = {
        "backbone.conv1.weight": "backbone.body.conv1.weight",
        "backbone.layer3.0.downsample.1.running_var": "backbone.body.layer3.0.downsample.1.running_var",
        "backbone.layer4.1.conv2.weight": "backbone.body.layer4.1.conv2.weight",
        "neck.lateral_convs.2.conv.weight": "neck.lateral_convs.2.weight",
        "neck.fpn_convs.1.conv.bias": "neck.output_convs.1.bias",
        "neck.fpn_convs.3.conv.weight": "neck.extra_convs.0.weight",
        "neck.fpn_convs.4.conv.weight": "neck.extra_convs.1.weight",
        "bbox_head.cls_convs.1.conv.weight": "head.cls_tower.1.0.weight",
        "bbox_head.reg_convs.0.conv.weight": "head.reg_tower.0.0.weight",
    }
    cls, reg, ctr = {"retinanet": ("retina_cls", "retina_reg", None), "atss": ("atss_cls", "atss_reg", "atss_centerness"),
                     "gfl": ("gfl_cls", "gfl_reg", None), "fcos": ("conv_cls", "conv_reg", "conv_centerness")}[head]
    pairs[f"bbox_head.{cls}.weight"] = "head.cls_pred.weight"
    pairs[f"bbox_head.{reg}.bias"] = "head.reg_pred.bias"
    if ctr:
        pairs[f"bbox_head.{ctr}.weight"] = "head.centerness_pred.weight"
    if head != "retinanet":
        pairs["bbox_head.reg_convs.1.gn.weight"] = "head.reg_tower.1.1.weight"
        pairs["bbox_head.scales.3.scale"] = "head.scales.3.scale"
    else:
        pairs["bbox_head.cls_convs.0.conv.bias"] = "head.cls_tower.0.0.bias"
    for mm_key, kd_key in pairs.items():
        assert torch.equal(src[mm_key], got[kd_key]), (mm_key, kd_key)
    # the P6 conv reads C5 for RetinaNet ('on_input') and P5 otherwise: the model runs
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 160, 192))
    assert [o.shape[-2:] for o in out["cls"]] == [(20, 24), (10, 12), (5, 6), (3, 3), (2, 2)]


def test_mmdet_variants_are_read_off_the_file():
    # FCOS tricks config: conv_bias=True with GroupNorm; early files name the predictors fcos_*
    ckpt = mmdet_checkpoint("fcos", with_bias=True)
    state = ckpt["state_dict"]
    for name in ("cls", "reg", "centerness"):
        for part in ("weight", "bias"):
            state[f"bbox_head.fcos_{name}.{part}"] = state.pop(f"bbox_head.conv_{name}.{part}")
    teacher = tiny_teacher("fcos", {"fcos_norm_on_bbox": True, "fcos_centerness_on_reg": True})
    model, got = _load(teacher, ckpt)
    assert torch.equal(got["head.reg_tower.1.0.bias"], state["bbox_head.reg_convs.1.conv.bias"])
    assert torch.equal(got["head.centerness_pred.bias"], state["bbox_head.fcos_centerness.bias"])
    assert model.head.centerness_on == "reg" and model.head.norm_on_bbox
    # caffe style: BGR-trained conv1 gets its input channels reversed for kdctl's RGB input
    ckpt = mmdet_checkpoint("atss")
    state, _ = convert_mmdet(ckpt, tiny_teacher("atss", {"backbone_style": "caffe"}), "ckpt.pth")
    assert torch.equal(state["backbone.body.conv1.weight"], ckpt["state_dict"]["backbone.conv1.weight"][:, [2, 1, 0]])


def test_caffe_style_moves_the_stride_to_the_first_1x1_conv():
    pytorch, caffe = Backbone("resnet50", style="pytorch"), Backbone("resnet50", style="caffe")
    with torch.no_grad():  # timm zero-initialises each block's last BN: give the branches a say
        for m in pytorch.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
    caffe.load_state_dict(pytorch.state_dict())
    for layer in ("layer2", "layer3", "layer4"):
        block_p, block_c = getattr(pytorch.body, layer)[0], getattr(caffe.body, layer)[0]
        assert (block_p.conv1.stride, block_p.conv2.stride) == ((1, 1), (2, 2))
        assert (block_c.conv1.stride, block_c.conv2.stride) == ((2, 2), (1, 1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = pytorch.eval()(x), caffe.eval()(x)
    assert [t.shape for t in a] == [t.shape for t in b] and not torch.allclose(a[-1], b[-1])
    with pytest.raises(KdctlError, match="bottleneck"):
        Backbone("resnet18", style="caffe")


@pytest.mark.parametrize("change, needle", [
    (lambda s: s.__setitem__("bbox_head.extra_conv.weight", torch.zeros(1)), "bbox_head.extra_conv.weight"),
    (lambda s: s.__setitem__("neck.fpn_convs.5.conv.weight", torch.zeros(1)), "neck.fpn_convs.5.conv.weight"),
    (lambda s: s.pop("neck.lateral_convs.1.conv.bias"), "neck.lateral_convs.1.conv.bias"),
    (lambda s: s.pop("bbox_head.gfl_cls.weight"), "gfl_cls"),
    (lambda s: s.__setitem__("bbox_head.integral.project", torch.linspace(0, 8, 17)), "integral.project"),
])
def test_mmdet_unmapped_or_missing_keys_are_named(change, needle):
    ckpt = mmdet_checkpoint("gfl")
    change(ckpt["state_dict"])
    with pytest.raises(KdctlError, match=needle.replace(".", r"\.")):
        _load(tiny_teacher("gfl"), ckpt)


def test_mmdet_wrong_shape_and_wrong_classes_are_errors():
    ckpt = mmdet_checkpoint("atss")
    ckpt["state_dict"]["bbox_head.atss_cls.weight"] = torch.zeros(20, 32, 3, 3)  # a 20-class model
    with pytest.raises(KdctlError, match="head.cls_pred.weight"):
        _load(tiny_teacher("atss"), ckpt)
    ckpt = mmdet_checkpoint("atss")
    ckpt["meta"]["CLASSES"] = tuple(reversed(COCO_CLASSES))
    with pytest.raises(KdctlError, match="COCO classes"):
        _load(tiny_teacher("atss"), ckpt)


# ------------------------------------------------------------------ real MMDetection files
def test_mmdet_class_list_with_underscores_is_the_coco_list():
    """``mmdet.evaluation.get_classes('coco')`` (what its tools write into files without names)
    spells ``traffic_light``, ``fire_hydrant``, ...: the same classes."""
    ckpt = mmdet_checkpoint("atss")
    ckpt["meta"]["CLASSES"] = tuple(c.replace(" ", "_") for c in COCO_CLASSES)
    assert "traffic_light" in ckpt["meta"]["CLASSES"]
    _load(tiny_teacher("atss"), ckpt)


def test_config_named_in_the_metadata_must_be_the_as_entry():
    plain = get_teacher("fcos_r50_caffe_fpn_gn-head_1x_coco")  # FCOS R-50 plain and the tricks config:
    tricks = get_teacher("fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco")  # identical keys
    assert plain.detector["head"] == tricks.detector["head"] == "fcos" and "center-normbbox" in tricks.name
    ckpt = mmdet_checkpoint("fcos")
    ckpt["meta"]["exp_name"] = f"{tricks.name}.py"
    with pytest.raises(KdctlError, match=f"names the config {tricks.name}.*--as {plain.name}; convert it --as {tricks.name}"):
        convert_mmdet(ckpt, plain, "f.pth")
    # no file name, only the config text: the tricks' norm_on_bbox is read off it
    ckpt["meta"] = {"CLASSES": COCO_CLASSES, "config": "model = dict(type='FCOS', backbone=dict(type='ResNet', style='caffe'), bbox_head=dict(type='FCOSHead', "
                    "norm_on_bbox=True, centerness_on_reg=True, center_sampling=True))"}
    with pytest.raises(KdctlError, match=f"sets norm_on_bbox=True, unlike {plain.name} \\(--as\\); convert it --as {tricks.name}"):
        convert_mmdet(ckpt, plain, "f.pth")
    convert_mmdet(ckpt, tricks, "f.pth")  # the right entry converts
    # RetinaNet: caffe style in the text, pytorch-style entry
    ckpt = mmdet_checkpoint("retinanet")
    ckpt["meta"]["config"] = "model = dict(type='RetinaNet', backbone=dict(type='ResNet', depth=50, style='caffe'))"
    with pytest.raises(KdctlError, match="sets style='caffe', unlike retinanet_r50_fpn_1x_coco.*--as retinanet_r50_caffe_fpn_1x_coco"):
        convert_mmdet(ckpt, get_teacher("retinanet_r50_fpn_1x_coco"), "f.pth")


def test_mmengine_training_checkpoint_is_refused_with_how_to_keep_the_weights(tmp_path, monkeypatch):
    """An ``epoch_N.pth`` holds MMEngine objects (``message_hub``); the safe loader refuses it and
    the message says how to keep ``state_dict`` + ``meta``. A stand-in class under MMEngine's
    module name makes such a file here (mmengine itself is not installed)."""
    import sys
    import types

    from kdctl.hub.fetch import read_untrusted

    mod = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self.values = [1.0, 2.0]

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = mod.__name__, "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, mod if name.endswith("history_buffer") else types.ModuleType(name))
    path = tmp_path / "epoch_12.pth"
    ckpt = {"state_dict": {"w": torch.zeros(2)}, "meta": {"epoch": 12}, "message_hub": {"log_scalars": {"loss": HistoryBuffer()}}}
    torch.save(ckpt, path)
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(KdctlError, match="MMEngine training checkpoint.*publish_model.py") as info:
        read_untrusted(path)
    assert "\n" not in str(info.value)
    torch.save({"state_dict": ckpt["state_dict"], "meta": ckpt["meta"]}, tmp_path / "published.pth")
    assert set(read_untrusted(tmp_path / "published.pth")) == {"state_dict", "meta"}
