"""Train / eval transforms over the sample dict of :mod:`kdctl.data.dataset`.

Every geometric op moves ``boxes`` and ``ignore`` (both ``tv_tensors.BoundingBoxes``) with the
image; ``labels``, ``ignore_labels``, ``image_id`` and ``orig_size`` pass through untouched.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def keep_ratio_size(h: int, w: int, short_side: int, max_side: int) -> tuple[int, int]:
    """Output ``(h, w)`` of MMDetection's keep-ratio resize: one scale
    ``min(short_side / min(h, w), max_side / max(h, w))`` for both axes, sides rounded to the
    nearest pixel (at least 1)."""
    scale = min(short_side / min(h, w), max_side / max(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


class KeepRatioResize(v2.Transform):
    """Resize so the shorter side is ``short_side`` unless that would make the longer side
    exceed ``max_side`` (then the longer side is ``max_side``). Bilinear with antialias for
    images; boxes are scaled by the per-axis ratio of new to old size."""

    def __init__(self, short_side: int, max_side: int):
        super().__init__()
        if short_side <= 0 or max_side <= 0:
            raise ValueError(f"short_side and max_side must be positive, got {short_side} and {max_side}")
        self.short_side, self.max_side = int(short_side), int(max_side)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return {"size": list(keep_ratio_size(h, w, self.short_side, self.max_side))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)

    def extra_repr(self) -> str:
        return f"short_side={self.short_side}, max_side={self.max_side}"


def normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one input normalisation of uint8 pixels, as float32 ``[C]`` constants ``(255 mean,
    1 / (255 std))``: ``(x - 255 mean) * (1 / (255 std))`` equals ``(x / 255 - mean) / std``.
    :class:`ToFloatNormalize` (training and eval), the model-file runner and the end-to-end
    export graph all use these numbers, so their inputs agree to the last bit."""
    return (torch.tensor([float(m) * 255.0 for m in mean]), torch.tensor([1.0 / (float(s) * 255.0) for s in std]))


class ToFloatNormalize(v2.Transform):
    """uint8 image -> float32 ``(x / 255 - mean) / std`` with one allocation: the same numbers
    as ``ToDtype(float32, scale=True)`` + ``Normalize`` (which allocate twice; at 512 px the
    allocation dominates). Boxes and other tv_tensors pass through."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        m255, inv = normalization(mean, std)
        self.mean, self.inv_std = m255.view(-1, 1, 1), inv.view(-1, 1, 1)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or isinstance(inpt, (tv_tensors.BoundingBoxes, tv_tensors.Mask)):
            return inpt
        if inpt.dtype != torch.uint8:
            raise TypeError(f"ToFloatNormalize expects a uint8 image, got {inpt.dtype}")
        out = inpt.as_subclass(torch.Tensor).to(torch.float32).sub_(self.mean).mul_(self.inv_std)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def build_transforms(
    train: bool,
    *,
    short_side: int,
    max_side: int,
    hflip: float = 0.5,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> v2.Compose:
    """The sample pipeline: keep-ratio resize, random horizontal flip (train only, probability
    ``hflip``), uint8 -> float32 on 0..1, then ``(x - mean) / std`` per channel.

    In: ``image`` uint8 ``[3, H, W]``, ``boxes`` / ``ignore`` XYXY pixels. Out: ``image`` float32
    ``[3, H', W']`` normalised, boxes in pixels of the resized (and flipped) image.
    """
    ops: list[v2.Transform] = [KeepRatioResize(short_side, max_side)]
    if train and hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    ops.append(ToFloatNormalize(mean, std))
    return v2.Compose(ops)


# ============================================================================= fixed-size input
def fit_size(h: int, w: int, H: int, W: int) -> tuple[int, int]:
    """Keep-ratio size of an ``h x w`` image fitted into ``H x W``: one scale
    ``min(H / h, W / w)``, sides rounded as :func:`keep_ratio_size`."""
    s = min(H / h, W / w)
    return min(H, max(1, int(h * s + 0.5))), min(W, max(1, int(w * s + 0.5)))


def pad_colour(mean: Sequence[float]) -> tuple[int, ...]:
    """The uint8 fill of a letterboxed image: the normalisation mean, ``round(255 * mean)``, so
    the padding normalises to (almost exactly) 0, the value the training batches pad with."""
    return tuple(int(round(255.0 * float(m))) for m in mean)


def letterbox(image: torch.Tensor, size: tuple[int, int], fill: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 ``[3, h, w]`` -> (uint8 ``[3, H, W]``, (h', w')): the keep-ratio resize of the
    evaluation pipeline (bilinear, antialias) fitted into the fixed input ``size`` =
    ``(H, W)``, padded at the bottom/right with ``fill`` (one value per channel). This is the
    input of every fixed-size model file (ONNX, TorchScript) and of ``kdctl predict``; the
    model side normalises, so every runtime sees the same numbers."""
    if image.dtype != torch.uint8:
        raise TypeError(f"letterbox expects a uint8 image, got {image.dtype}")
    H, W = (int(v) for v in size)
    nh, nw = fit_size(int(image.shape[-2]), int(image.shape[-1]), H, W)
    out = torch.tensor(list(fill), dtype=torch.uint8).view(-1, 1, 1).expand(image.shape[0], H, W).clone()
    out[:, :nh, :nw] = F.resize(image, [nh, nw], antialias=True)
    return out, (nh, nw)
