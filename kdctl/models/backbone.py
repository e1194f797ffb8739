"""timm ``features_only`` backbones that return C3, C4, C5 (strides 8, 16, 32).

A backbone is named by its timm name; the stages are picked from timm's
``feature_info.reduction()``, never from a per-model table, so any timm CNN with stride-8/16/32
features works (resnet*, convnext*, efficientnet*, regnet*, ...).

What a "stage" is (for ``frozen_stages``): stage 0 is the stem, i.e. every parameter before the
first feature tap with reduction >= 4 (ResNet ``conv1``/``bn1``; ConvNeXt ``stem``; EfficientNet
``conv_stem``/``bn1``/``blocks.0``). Stage k >= 1 is the k-th feature tap with reduction >= 4
(ResNet ``layer{k}``, ConvNeXt ``stages.{k-1}``, EfficientNet ``blocks.1``, ``blocks.2``,
``blocks.3-4``, ``blocks.5-6``) together with any untapped blocks just before it. This is
MMDetection's ResNet ``frozen_stages`` (0: stem, 1: stem + layer1) generalised by feature taps.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError
from kdctl.models import cspelan  # noqa: F401  registers kdctl's own cspelan_* backbones with timm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a local weights file, loaded without running any code.

    ``.safetensors`` is read with ``safetensors.torch.load_file``; ``.pth``/``.pt``/``.bin``
    with ``torch.load(weights_only=True)``, which refuses pickled objects other than tensors
    and plain containers. A checkpoint ``{"state_dict": ...}`` or ``{"model": ...}`` is
    unwrapped. Raises KdctlError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise KdctlError(f'{path}: no such weights file; give a local .safetensors or .pth file, or "timm" for timm\'s own weights')
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise KdctlError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise KdctlError(
                f"{path}: refused to load: the file holds pickled objects, not only tensors; "
                "convert it to .safetensors in an environment you trust"
            ) from None
        except Exception as exc:
            raise KdctlError(f"{path}: cannot read checkpoint ({_first_line(exc)})") from None
    else:
        raise KdctlError(f"{path}: unknown weights format {suffix or '(no suffix)'!r}; use .safetensors or .pth")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise KdctlError(f"{path}: expected a mapping of parameter names to tensors (a state dict)")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a prefix shared by every key: DDP ``module.``, this class's ``body.``, ``backbone.``."""
    changed = True
    while changed and state:
        changed = False
        for prefix in ("module.", "backbone.", "body."):
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


class Backbone(nn.Module):
    """A timm CNN returning ``[C3, C4, C5]`` with shapes ``[B, channels[i], H/s_i, W/s_i]``.

    Args:
        name: a timm model name (``timm.list_models()``).
        pretrained: None (random init), a local ``.safetensors``/``.pth`` file holding the timm
            model's state dict (classifier keys are ignored) or this backbone's own, or
            ``"timm"`` for timm's hub download.
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) even in
            ``.train()``, as MMDetection's ``norm_eval``; their affine weights still train.
            No effect on LayerNorm/GroupNorm models.
        frozen_stages: -1 nothing frozen, 0 the stem, k the stem and stages 1..k (see module
            docstring); frozen parameters get ``requires_grad=False`` and their modules stay
            in eval mode.
        reductions: the feature strides to return, in order.
        style: "pytorch" (timm's ResNets: a downsampling bottleneck strides in its 3x3 conv) or
            "caffe" (MMDetection ``style='caffe'``: the stride moves to the block's first 1x1
            conv; only bottleneck ResNets/ResNeXts).
        bn_eps: replace every BatchNorm's eps (torchvision's RetinaNet v1 COCO weights use 0.0,
            ``overwrite_eps``); None keeps timm's 1e-5.
        mean, std: input normalisation (RGB in [0, 1]) replacing the timm model's.

    Attributes: ``channels`` and ``strides`` (lists, one per output), ``mean``/``std`` (the
    model's pretrained_cfg normalisation, RGB in [0, 1]), ``num_stages``.
    """

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        norm_eval: bool = True,
        frozen_stages: int = -1,
        reductions: Sequence[int] = (8, 16, 32),
        style: str = "pytorch",
        bn_eps: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.name = name
        self.norm_eval = norm_eval
        self.frozen_stages = frozen_stages
        taps, full_keys = _describe(name)
        out_indices = _pick_taps(name, taps, reductions)
        try:
            self.body = timm.create_model(name, features_only=True, pretrained=pretrained == "timm", out_indices=out_indices)
        except Exception as exc:
            if pretrained != "timm":
                raise
            raise KdctlError(
                f"backbone {name!r}: could not get timm's pretrained weights ({_first_line(exc)}); "
                "if offline, download them elsewhere and set `pretrained` to the local .safetensors/.pth file"
            ) from None
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", IMAGENET_MEAN) if mean is None else mean)
        self.std: tuple[float, ...] = tuple(cfg.get("std", IMAGENET_STD) if std is None else std)
        if style == "caffe":
            _caffe_strides(self.body, name)
        elif style != "pytorch":
            raise ValueError(f"style must be 'pytorch' or 'caffe', got {style!r}")
        if bn_eps is not None:
            for module in self.body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eps = float(bn_eps)
        self._full_name = _full_names(list(self.body.state_dict()), full_keys)
        self._ignorable = full_keys - set(self._full_name.values())  # classifier head etc.
        if pretrained is not None and pretrained != "timm":
            self.load_weights(pretrained)
        stage_of = _stage_of_params(self.body, self._full_name, taps)
        self.num_stages = max(stage_of.values(), default=0)
        if not -1 <= frozen_stages <= self.num_stages:
            raise KdctlError(f"frozen_stages={frozen_stages}, but backbone {name!r} has stages 0..{self.num_stages}; use -1 to {self.num_stages}")
        for pname, param in self.body.named_parameters():
            if stage_of[pname] <= frozen_stages:
                param.requires_grad_(False)
        # a module whose parameters are all frozen stays in eval mode (BN stats, drop-path)
        self._frozen_modules = [
            m for m in self.body.modules()
            if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())
        ]
        self.train(self.training)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x``: ``[B, 3, H, W]`` normalised images -> ``[C3, C4, C5]``."""
        return list(self.body(x))

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if mode:
            for module in self._frozen_modules:
                module.eval()
            if self.norm_eval:
                for module in self.body.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def load_weights(self, path: str | Path) -> None:
        """Load a local weights file (see ``load_state_dict_file``) into the backbone.

        Keys may follow the full timm model (``stages.0...``, classifier keys ignored) or the
        features model (``stages_0...``). Missing/unexpected keys or shape mismatches raise one
        KdctlError naming the file and the first few keys.
        """
        state = _strip_prefix(load_state_dict_file(path))
        own = self.body.state_dict()
        picked, used, missing, bad_shape = {}, set(), [], []
        for key, ref in own.items():
            src = next((k for k in (key, self._full_name[key]) if k in state), None)
            if src is None:
                if not key.endswith("num_batches_tracked"):  # absent from many published checkpoints
                    missing.append(key)
                continue
            used.add(src)
            if state[src].shape != ref.shape:
                bad_shape.append(f"{src} {tuple(state[src].shape)} vs {tuple(ref.shape)}")
            picked[key] = state[src]
        unexpected = [k for k in state if k not in used and k not in self._ignorable]
        if missing or unexpected or bad_shape:
            parts = []
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
                if keys:
                    more = f", ... {len(keys) - 3} more" if len(keys) > 3 else ""
                    parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{more})")
            raise KdctlError(
                f"{path}: weights do not fit backbone {self.name!r}: {'; '.join(parts)}; "
                f"save the state_dict of timm.create_model({self.name!r})"
            )
        self.body.load_state_dict(picked, strict=False)


def _caffe_strides(body: nn.Module, name: str) -> None:
    """Move the stride of every downsampling bottleneck from its 3x3 ``conv2`` to its 1x1
    ``conv1`` (MMDetection's ResNet ``style='caffe'``: ``conv1_stride = stride``). Only the
    convs' strides change; the parameters and their shapes stay the same."""
    moved = 0
    for module in body.modules():
        conv1, conv2 = getattr(module, "conv1", None), getattr(module, "conv2", None)
        if isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d) and hasattr(module, "conv3"):
            if conv2.stride != (1, 1) and conv1.kernel_size == (1, 1):
                conv1.stride, conv2.stride = conv2.stride, (1, 1)
                moved += 1
    if not moved:
        raise KdctlError(f"backbone {name!r}: style 'caffe' needs a ResNet/ResNeXt with bottleneck blocks (resnet50, resnext101_32x4d, ...)")


def _describe(name: str) -> tuple[list[dict], set[str]]:
    """The full model's feature taps (``module``, ``reduction``) and state-dict keys, read
    from a copy built on the meta device (no memory, no init cost)."""
    if not timm.is_model(name):
        raise KdctlError(f"unknown timm backbone {name!r}; see `timm.list_models()`")
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # a model whose init needs real tensors
        model = timm.create_model(name, pretrained=False)
    info = getattr(model, "feature_info", None)
    if not info:
        raise KdctlError(f"backbone {name!r} does not describe its feature maps (no feature_info); pick a CNN such as resnet50")
    taps = [dict(d) for d in (info.info if hasattr(info, "info") else info)]
    return taps, set(model.state_dict())


def _pick_taps(name: str, taps: list[dict], reductions: Sequence[int]) -> list[int]:
    """Index of the deepest tap with each wanted reduction; KdctlError if one is absent."""
    found = {d["reduction"]: i for i, d in enumerate(taps)}  # later taps win: the deepest
    absent = [r for r in reductions if r not in found]
    if absent:
        have = sorted({d["reduction"] for d in taps})
        raise KdctlError(
            f"backbone {name!r} has no feature map with stride {', '.join(map(str, absent))} "
            f"(its strides: {have}); an FPN needs strides {list(reductions)}: pick a CNN such as resnet50, convnext_tiny or efficientnet_b3"
        )
    return [found[r] for r in reductions]


def _full_names(body_keys: list[str], full_keys: set[str]) -> dict[str, str]:
    """Body key -> full-model key. timm's FeatureListNet flattens top-level Sequentials
    (``stages.0`` becomes ``stages_0``); undo that by trying each ``_`` of the first name."""
    out = {}
    for key in body_keys:
        out[key] = key
        if key in full_keys:
            continue
        head, _, rest = key.partition(".")
        for i, ch in enumerate(head):
            cand = f"{head[:i]}.{head[i + 1:]}.{rest}" if ch == "_" else None
            if cand in full_keys:
                out[key] = cand
                break
    return out


def _stage_of_params(body: nn.Module, full_name: dict[str, str], taps: list[dict]) -> dict[str, int]:
    """Parameter name -> stage number (see module docstring). Parameters are walked in
    registration order, which in timm CNNs is execution order."""
    stage_of_tap, count = [], 0
    for d in taps:
        count += d["reduction"] >= 4
        stage_of_tap.append(count if d["reduction"] >= 4 else 0)
    first_stage = next((i for i, d in enumerate(taps) if d["reduction"] >= 4), len(taps))
    out, pos, inside = {}, 0, False
    for pname, _ in body.named_parameters():
        fname = full_name.get(pname, pname)
        tap = next((i for i, d in enumerate(taps) if fname.startswith(d["module"] + ".")), None)
        if tap is not None:
            pos, inside = tap, True
            out[pname] = stage_of_tap[tap]
            continue
        if inside:  # left a tapped module: what follows belongs to the next stage
            pos, inside = pos + 1, False
        out[pname] = 0 if pos <= first_stage else stage_of_tap[min(pos, len(taps) - 1)]
    return out
