"""The optimizer of a training run, built from the recipe's ``train`` section.

Only parameters with ``requires_grad`` are handed to the optimizer: frozen backbone stages,
``norm_eval`` statistics and the whole teacher stay out of it (and out of its state).

Weight decay follows what the published detectors were trained with:

- **SGD** (``train.optimizer: sgd``): one param group, weight decay on *every* parameter,
  biases and normalisation weights included. This is MMDetection's default detector config
  (``SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)`` with no ``paramwise_cfg``), which the
  RetinaNet / FCOS / ATSS / GFL / CrossKD numbers come from; changing it would change them.
- **AdamW** (``train.optimizer: adamw``): two param groups, ``decay`` (weights with two or more
  dimensions: convolutions, linear layers) and ``no_decay`` (1-D and 0-D parameters: biases and
  GroupNorm/BatchNorm affine weights). Decoupled decay pulls parameters toward zero, which for
  a norm layer's scale or a bias is a change of the function rather than a regulariser; this is
  the usual AdamW practice (MMDetection's ``norm_decay_mult=0, bias_decay_mult=0``).

Both groups always exist, even when one is empty, so that an optimizer state saved by one
model loads into another built from the same recipe.
"""
from __future__ import annotations

import torch
from torch import nn

from kdctl.recipe import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two param groups: ``decay`` (ndim >= 2) with ``weight_decay`` and ``no_decay``
    (biases, norm weights: ndim <= 1) with none. Frozen parameters are left out. Each group
    carries a ``name`` key for logs."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over ``model``'s trainable parameters, as set by ``cfg`` (``train`` section).

    ``cfg.lr`` is the base lr (the schedule multiplies it, see ``kdctl.engine.schedule``);
    ``cfg.momentum`` is used by SGD only. Raises ValueError when nothing is trainable.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    if cfg.optimizer == "sgd":
        group = {"name": "all", "params": params}
        return torch.optim.SGD([group], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected sgd or adamw")
