"""``DenseHead``: two conv towers (shared across FPN levels, or one per level), per-branch
predictors, and the public tower API that CrossKD uses to run one head's features through
another head.

A tower is ``stacked_convs`` blocks; block i is ``conv3x3 -> norm`` ("pre-activation"), and an
activation (ReLU; SiLU for the yolo family) follows every block. The predictors are convs (3x3;
1x1 for the yolo family) on the activated output of the last block. RetinaNet, FCOS, ATSS and
GFL share one tower per branch across levels; decoupled real-time heads (YOLOX, Ge et al. 2021)
have their own towers and predictors per level (``per_level=True``). Heads return raw per-level
tensors and never losses.

The distillation API, for one neck level ``x`` of shape ``[B, in_channels, H, W]`` at index
``level``:

- ``forward_tower(x, branch, upto, level)`` -> the pre-activation output of block ``upto - 1``
  (``[B, feat_channels, H, W]``); ``upto=0`` returns ``x``. ``level`` selects the level's tower
  (ignored by shared towers, required by per-level ones).
- ``forward_from(feat, branch, start, level)`` -> the raw outputs of ``branch`` at ``level``,
  continuing from ``forward_tower(..., upto=start, level=level)``: activation (when
  ``start > 0``), blocks ``start..N-1`` with their activations, the predictors, and the level's
  ``Scale`` where the head has one. So ``forward_from(forward_tower(x, b, i, l), b, i, l)`` is
  the plain forward for every i.

CrossKD (Wang et al., CVPR 2024) feeds the student's ``forward_tower(x_s, b, i)`` into the
teacher's ``forward_from(..., b, i, l)``. Activations are never in place, so a tensor returned
by ``forward_tower`` can be reused by both heads.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdctl.errors import KdctlError

Branch = Literal["cls", "reg"]
BRANCHES: tuple[str, str] = ("cls", "reg")


def class_rows(classes, num_classes: int, num_anchors: int) -> Tensor:
    """int64 ``[A * len(classes)]``: the rows of a head's ``cls_pred`` (``A*K`` output channels,
    anchor-major, channel ``a*K + k``) that hold ``classes`` (indices in ``[0, K)``) for every
    anchor, anchor-major."""
    index = torch.as_tensor(list(classes), dtype=torch.long)
    return (torch.arange(num_anchors)[:, None] * num_classes + index[None, :]).reshape(-1)


def keep_conv_rows(old: nn.Conv2d, rows: torch.Tensor) -> nn.Conv2d:
    """A Conv2d of ``old``'s output channels ``rows`` (int64 ``[R]``), weights and biases copied,
    in ``old``'s training mode and ``requires_grad``."""
    rows = rows.to(old.weight.device)
    # built on the meta device, then filled: no initialisation draws (later random inits stay the same)
    new = nn.Conv2d(old.in_channels, rows.numel(), old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None, old.padding_mode, device="meta", dtype=old.weight.dtype)
    new = new.to_empty(device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight[rows])
        if old.bias is not None:
            new.bias.copy_(old.bias[rows])
    new.requires_grad_(old.weight.requires_grad)
    return new.train(old.training)


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level for FCOS/ATSS/GFL), initialised to 1."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def make_norm(kind: Literal["gn", "bn", "none"], channels: int, num_groups: int = 32) -> nn.Module | None:
    """GroupNorm(num_groups), BatchNorm2d or None; KdctlError if GN groups do not divide."""
    if kind == "gn":
        if channels % num_groups:
            raise KdctlError(
                f"feat_channels={channels} is not divisible by GroupNorm's {num_groups} groups; "
                f"use a multiple of {num_groups} or norm 'bn' / 'none'"
            )
        return nn.GroupNorm(num_groups, channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return None
    raise ValueError(f"norm must be 'gn', 'bn' or 'none', got {kind!r}")


def _tower(in_channels: int, feat_channels: int, depth: int, norm: str, num_groups: int,
           conv_bias: bool | None = None) -> nn.ModuleList:
    """``depth`` blocks of conv3x3 (+ norm); ``conv_bias`` None: the conv has a bias only without
    a norm (mmcv's ConvModule ``bias='auto'``); True also with a norm (torchvision's FCOS head,
    mmdet FCOS ``conv_bias=True``)."""
    blocks = nn.ModuleList()
    for i in range(depth):
        layer = make_norm(norm, feat_channels, num_groups)
        bias = layer is None if conv_bias is None else conv_bias
        conv = nn.Conv2d(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1, bias=bias)
        blocks.append(nn.Sequential(conv) if layer is None else nn.Sequential(conv, layer))
    return blocks


class DenseHead(nn.Module):
    """Shared base of the RetinaNet, FCOS, ATSS, GFL and yolo heads (subclasses only pick sizes).

    Args:
        num_classes: K, sigmoid classes (no background channel).
        in_channels: FPN channels; a list of one per level for a neck whose widths differ
            (per-level towers only).
        feat_channels: tower width.
        stacked_convs: N, blocks per tower.
        num_anchors: A, priors per location.
        reg_channels: regression outputs per prior (4 deltas / ltrb, or 4*(reg_max+1)).
        centerness_on: the tower whose output feeds a centerness conv, or None.
        num_levels: FPN levels (one ``Scale`` each when ``use_scale``).
        use_scale: multiply the regression output by a learnable per-level scalar.
        norm, num_groups: tower normalisation (GroupNorm(32) in mmdet's FCOS/ATSS/GFL).
        prior_prob: initial foreground probability; the cls bias is ``-log((1-p)/p)``.
        conv_bias: tower convs with a bias: None = only without a norm (see ``_tower``).
        per_level: one tower per branch and one set of predictors per level (``cls_tower[l]``,
            ``cls_pred[l]``, ...) instead of one shared across levels.
        activation: "relu" or "silu", after every tower block.
        pred_kernel: kernel size of the predictor convs (3, or 1).

    Attributes: ``num_classes``, ``in_channels``, ``feat_channels``, ``num_anchors``,
    ``num_blocks`` (= N), ``num_levels``, ``branch_outputs`` (branch -> names it returns),
    ``output_names`` (the keys of ``forward``'s result).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int | list[int],
        feat_channels: int = 256,
        stacked_convs: int = 4,
        *,
        num_anchors: int = 1,
        reg_channels: int = 4,
        centerness_on: Branch | None = None,
        num_levels: int = 5,
        use_scale: bool = True,
        norm: Literal["gn", "bn", "none"] = "gn",
        num_groups: int = 32,
        prior_prob: float = 0.01,
        conv_bias: bool | None = None,
        per_level: bool = False,
        activation: Literal["relu", "silu"] = "relu",
        pred_kernel: int = 3,
    ):
        super().__init__()
        if activation not in ("relu", "silu"):
            raise ValueError(f"activation must be 'relu' or 'silu', got {activation!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.num_blocks = stacked_convs
        self.num_anchors = num_anchors
        self.num_levels = num_levels
        self.centerness_on = centerness_on
        self.per_level = per_level
        self.activation = F.relu if activation == "relu" else F.silu
        pad = pred_kernel // 2
        if not isinstance(in_channels, int) and (not per_level or len(in_channels) != num_levels):
            raise ValueError(f"one input width per level ({list(in_channels)}) needs per_level towers for "
                             f"{num_levels} levels")
        if per_level:
            widths = [in_channels] * num_levels if isinstance(in_channels, int) else [int(c) for c in in_channels]

            def towers():
                return nn.ModuleList(_tower(c, feat_channels, stacked_convs, norm, num_groups, conv_bias)
                                     for c in widths)

            def preds(channels):
                return nn.ModuleList(nn.Conv2d(feat_channels, channels, pred_kernel, padding=pad)
                                     for _ in range(num_levels))

            self.cls_tower, self.reg_tower = towers(), towers()
            self.cls_pred, self.reg_pred = preds(num_anchors * num_classes), preds(num_anchors * reg_channels)
            self.centerness_pred = preds(num_anchors) if centerness_on else None
        else:
            self.cls_tower = _tower(in_channels, feat_channels, stacked_convs, norm, num_groups, conv_bias)
            self.reg_tower = _tower(in_channels, feat_channels, stacked_convs, norm, num_groups, conv_bias)
            self.cls_pred = nn.Conv2d(feat_channels, num_anchors * num_classes, pred_kernel, padding=pad)
            self.reg_pred = nn.Conv2d(feat_channels, num_anchors * reg_channels, pred_kernel, padding=pad)
            self.centerness_pred = (nn.Conv2d(feat_channels, num_anchors, pred_kernel, padding=pad)
                                    if centerness_on else None)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels)) if use_scale else None
        self.branch_outputs: dict[str, tuple[str, ...]] = {
            b: (("cls",) if b == "cls" else ("reg",)) + (("centerness",) if centerness_on == b else ())
            for b in BRANCHES
        }
        self.output_names: tuple[str, ...] = ("cls", "reg") + (("centerness",) if centerness_on else ())
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob: float) -> None:
        """mmdet's dense-head init: every conv normal(std=0.01), zero bias; the cls bias set so
        that sigmoid(bias) = prior_prob; norms weight 1, bias 0 (PyTorch's default)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for conv in (self.cls_pred if self.per_level else [self.cls_pred]):
            nn.init.constant_(conv.bias, -math.log((1 - prior_prob) / prior_prob))

    # ------------------------------------------------------------------ distillation API
    def tower(self, branch: Branch, level: int | None = None) -> nn.ModuleList:
        """The blocks of ``branch`` ("cls" or "reg") at ``level`` (shared towers: the same for
        every level, and ``level`` may be None; per-level towers need it)."""
        if branch == "cls":
            towers = self.cls_tower
        elif branch == "reg":
            towers = self.reg_tower
        else:
            raise ValueError(f"branch must be 'cls' or 'reg', got {branch!r}")
        if level is not None and not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in 0..{self.num_levels - 1}, got {level}")
        if not self.per_level:
            return towers
        if level is None:
            raise ValueError("this head has one tower per level: pass the level")
        return towers[level]

    def predictor(self, name: str, level: int) -> nn.Conv2d:
        """The ``name`` ("cls", "reg", "centerness") predictor conv used at ``level``."""
        pred = getattr(self, f"{name}_pred")
        return pred[level] if self.per_level else pred

    def forward_tower(self, x: Tensor, branch: Branch, upto: int, level: int | None = None) -> Tensor:
        """Blocks ``0..upto-1`` of ``branch`` on one level (``level``: its index, needed by
        per-level towers); the pre-activation (conv+norm, no activation) output of block
        ``upto-1``, ``[B, feat_channels, H, W]``; ``upto=0`` returns ``x`` (the neck feature,
        ``[B, in_channels, H, W]``)."""
        blocks = self.tower(branch, level)
        if not 0 <= upto <= len(blocks):
            raise ValueError(f"upto must be in 0..{len(blocks)}, got {upto}")
        for i in range(upto):
            x = blocks[i](self.activation(x) if i > 0 else x)
        return x

    def forward_from(self, feat: Tensor, branch: Branch, start: int, level: int) -> dict[str, Tensor]:
        """Continue ``branch`` at ``level`` from ``forward_tower(x, branch, start)``.

        Returns the branch's raw outputs (``self.branch_outputs[branch]``): ``"cls"``
        ``[B, A*K, H, W]`` logits; ``"reg"`` ``[B, A*reg_channels, H, W]`` (scaled by the level's
        ``Scale``, float32); ``"centerness"`` ``[B, A, H, W]`` logits on the tower it belongs to.
        """
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in 0..{self.num_levels - 1}, got {level}")
        blocks = self.tower(branch, level)
        if not 0 <= start <= len(blocks):
            raise ValueError(f"start must be in 0..{len(blocks)}, got {start}")
        x = self.activation(feat) if start > 0 else feat
        for i in range(start, len(blocks)):
            x = self.activation(blocks[i](x))
        out: dict[str, Tensor] = {}
        if branch == "cls":
            out["cls"] = self.predictor("cls", level)(x)
        else:
            reg = self.predictor("reg", level)(x)
            if self.scales is not None:
                reg = self.scales[level](reg).float()  # float: keep exp/softmax of it safe under fp16
            out["reg"] = self.activate_reg(reg)
        if self.centerness_pred is not None and self.centerness_on == branch:
            out["centerness"] = self.predictor("centerness", level)(x)
        return out

    def activate_reg(self, reg: Tensor) -> Tensor:
        """The function applied to the scaled regression output (identity; FCOS: exp/ReLU)."""
        return reg

    def forward(self, feats: list[Tensor]) -> dict[str, list[Tensor]]:
        """FPN levels ``[B, in_channels, H_l, W_l]`` -> ``{"cls": [...], "reg": [...],
        "centerness": [...] (if the head has it)}``, one tensor per level (see forward_from)."""
        if len(feats) > self.num_levels:
            raise ValueError(f"head built for {self.num_levels} levels, got {len(feats)}")
        out: dict[str, list[Tensor]] = {name: [] for name in self.output_names}
        for level, x in enumerate(feats):
            for branch in BRANCHES:
                for name, value in self.forward_from(x, branch, 0, level).items():
                    out[name].append(value)
        return out

    def forward_with_tower(self, feats: list[Tensor], upto: int) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]:
        """The plain forward over neck ``feats`` that also returns each branch's pre-activation
        tower output at ``upto`` (``{"cls": [per level], "reg": [...]}``, what CrossKD crosses);
        the predictions equal ``self(feats)``."""
        out: dict[str, list[Tensor]] = {name: [] for name in self.output_names}
        mid: dict[str, list[Tensor]] = {b: [] for b in BRANCHES}
        for level, x in enumerate(feats):
            for branch in BRANCHES:
                feat = self.forward_tower(x, branch, upto, level)
                mid[branch].append(feat)
                for name, value in self.forward_from(feat, branch, upto, level).items():
                    out[name].append(value)
        return out, mid
