"""Backbone (timm features_only) and FPN: strides, freezing, weight loading, output shapes."""
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from kdctl.errors import KdctlError
from kdctl.models.backbone import Backbone, load_state_dict_file
from kdctl.models.necks import FPN


@pytest.mark.parametrize(
    "name, channels",
    [("resnet18", [128, 256, 512]), ("resnet50", [512, 1024, 2048]), ("efficientnet_b0", [40, 112, 320]), ("convnext_atto", [80, 160, 320])],
)
def test_strides_and_channels(name, channels):
    bb = Backbone(name, frozen_stages=-1)
    assert bb.strides == [8, 16, 32]
    assert bb.channels == channels
    feats = bb(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 96 // s) for c, s in zip(channels, (8, 16, 32))]


def test_backbone_without_stride8_is_a_clear_error():
    with pytest.raises(KdctlError, match="no feature map with stride 8"):
        Backbone("vit_tiny_patch16_224")


def test_mean_std_come_from_pretrained_cfg():
    assert Backbone("resnet18").mean == pytest.approx((0.485, 0.456, 0.406))
    assert Backbone("resnet18").std == pytest.approx((0.229, 0.224, 0.225))
    assert Backbone("tf_mobilenetv3_small_minimal_100").mean == pytest.approx((0.5, 0.5, 0.5))


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_norm_eval_keeps_bn_statistics_frozen():
    bb = Backbone("resnet18", norm_eval=True, frozen_stages=-1).train()
    assert bb.training and all(not m.training for m in _bns(bb))
    before = [m.running_mean.clone() for m in _bns(bb)]
    bb(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, _bns(bb)))
    assert all(m.weight.requires_grad for m in _bns(bb))  # affine params still train

    free = Backbone("resnet18", norm_eval=False, frozen_stages=-1).train()
    assert all(m.training for m in _bns(free))
    before = free.body.layer2[0].bn1.running_mean.clone()
    free(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, free.body.layer2[0].bn1.running_mean)


def test_frozen_stages_resnet():
    bb = Backbone("resnet18", norm_eval=False, frozen_stages=1).train()
    for name, p in bb.body.named_parameters():
        frozen = name.split(".")[0] in ("conv1", "bn1", "layer1")
        assert p.requires_grad != frozen, name
    assert not bb.body.layer1[0].bn1.training  # frozen stage stays in eval mode
    assert bb.body.layer2[0].bn1.training
    stem_only = Backbone("resnet18", frozen_stages=0)
    assert not stem_only.body.conv1.weight.requires_grad and stem_only.body.layer1[0].conv1.weight.requires_grad
    assert all(p.requires_grad for p in Backbone("resnet18", frozen_stages=-1).parameters())
    with pytest.raises(KdctlError, match="frozen_stages=5"):
        Backbone("resnet18", frozen_stages=5)


def test_frozen_stages_convnext_and_efficientnet():
    bb = Backbone("convnext_atto", frozen_stages=1)
    frozen = {n.split(".")[0] for n, p in bb.body.named_parameters() if not p.requires_grad}
    assert frozen == {"stem_0", "stem_1", "stages_0"}
    eff = Backbone("efficientnet_b0", frozen_stages=1)
    frozen = {".".join(n.split(".")[:2]) for n, p in eff.body.named_parameters() if not p.requires_grad}
    assert {f for f in frozen if f.startswith("blocks")} == {"blocks.0", "blocks.1"}
    assert eff.body.blocks[2][0].conv_pw.weight.requires_grad


def test_safetensors_round_trip(tmp_path):
    src = Backbone("resnet18")
    path = tmp_path / "r18.safetensors"
    save_file(src.state_dict(), str(path))
    dst = Backbone("resnet18", pretrained=str(path))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_full_timm_checkpoint_in_pth_wrapper(tmp_path):
    # a classification checkpoint: flattened names (stages.0 -> stages_0) are mapped, head ignored
    full = timm.create_model("convnext_atto")
    path = tmp_path / "convnext.pth"
    torch.save({"state_dict": full.state_dict(), "epoch": 3}, path)
    bb = Backbone("convnext_atto", pretrained=str(path))
    assert torch.equal(bb.body.stages_1.blocks[0].conv_dw.weight, full.stages[1].blocks[0].conv_dw.weight)
    assert torch.equal(bb.body.stem_0.weight, full.stem[0].weight)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(str(marker))}, path)
    with pytest.raises(KdctlError, match="evil.pth: refused"):
        Backbone("resnet18", pretrained=str(path))
    assert not marker.exists()
    # the payload is real: a plain unpickle does run it
    other = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(str(other)))).close()
    assert other.exists()


def test_wrong_keys_and_shapes_are_clear(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["layer4.1.conv2.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(KdctlError) as err:
        Backbone("resnet18", pretrained=str(path))
    msg = str(err.value)
    assert str(path) in msg and "1 missing (layer4.1.conv2.weight)" in msg and "1 unexpected (extra.weight)" in msg
    assert "\n" not in msg

    state = timm.create_model("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    save_file(state, str(path))
    with pytest.raises(KdctlError, match=r"wrong shape \(conv1.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)\)"):
        Backbone("resnet18", pretrained=str(path))


def test_unreadable_weight_files(tmp_path):
    with pytest.raises(KdctlError, match="no such weights file"):
        load_state_dict_file(tmp_path / "absent.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(KdctlError, match="unknown weights format"):
        load_state_dict_file(tmp_path / "w.npz")
    (tmp_path / "w.safetensors").write_bytes(b"garbage")
    with pytest.raises(KdctlError, match="not a readable safetensors"):
        load_state_dict_file(tmp_path / "w.safetensors")


def test_timm_download_failure_suggests_local_file(monkeypatch):
    real = timm.create_model

    def offline(name, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(KdctlError, match="could not get timm's pretrained weights.*local .safetensors"):
        Backbone("resnet18", pretrained="timm")


# ----------------------------------------------------------------------------- FPN
@pytest.mark.parametrize("extra_from", ["c5", "p5"])
def test_fpn_shapes_on_odd_input(extra_from):
    bb = Backbone("resnet18")
    fpn = FPN(bb.channels, 32, extra_from=extra_from)
    outs = fpn(bb(torch.randn(1, 3, 250, 333)))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 32, 42), (1, 32, 16, 21), (1, 32, 8, 11), (1, 32, 4, 6), (1, 32, 2, 3)]
    assert fpn.strides == [8, 16, 32, 64, 128] and fpn.num_outs == 5 and fpn.out_channels == 32
    assert fpn.extra_convs[0].in_channels == (512 if extra_from == "c5" else 32)


def test_fpn_top_down_is_size_matched_nearest():
    fpn = FPN([1, 1, 1], 1)
    with torch.no_grad():  # identity laterals and output convs: P_l = C_l + up(P_{l+1})
        for conv in fpn.lateral_convs:
            conv.weight.fill_(1.0)
        for conv in fpn.output_convs:
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
    c5 = torch.arange(6.0).reshape(1, 1, 2, 3)
    c4 = torch.zeros(1, 1, 3, 5)  # odd: not 2x of c5
    c3 = torch.zeros(1, 1, 5, 9)
    p3, p4, p5, *_ = fpn([c3, c4, c5])
    assert torch.equal(p5, c5)
    # nearest: source index floor(i * in / out)
    expect4 = torch.tensor([[0.0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]])
    assert torch.equal(p4[0, 0], expect4)
    assert torch.equal(p3[0, 0], expect4[[0, 0, 1, 1, 2]][:, [0, 0, 1, 1, 2, 2, 3, 3, 4]])


def test_fpn_relu_before_p7_and_init():
    torch.manual_seed(0)
    feats = [torch.randn(1, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]
    for relu in (False, True):
        fpn = FPN([8, 16, 32], 16, extra_from="p5", relu_before_p7=relu)
        p5, p6, p7 = fpn(feats)[2:]
        assert torch.allclose(p6, fpn.extra_convs[0](p5))
        assert torch.allclose(p7, fpn.extra_convs[1](F.relu(p6) if relu else p6))
    for conv in (m for m in fpn.modules() if isinstance(m, nn.Conv2d)):
        fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * conv.weight[0, 0].numel()
        assert conv.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5 and not conv.bias.any()
