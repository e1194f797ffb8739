"""Weight EMA (``train.ema``): an exponential moving average of the trained detector's weights.

Polyak averaging (Polyak & Juditsky 1992, "Acceleration of stochastic approximation by
averaging", SIAM J. Control Optim. 30(4)) in the exponential form that detectors train with,
with the ramped decay that is common practice in modern real-time detectors (YOLOX, YOLOv5/v8,
RTMDet's ``ExpMomentumEMA``, PP-YOLOE)::

    d_n = decay * (1 - exp(-n / tau))         n = 1, 2, ...: optimizer steps applied so far
    ema <- d_n * ema + (1 - d_n) * weights    (torch._foreach_lerp_ with weight 1 - d_n)

The ramp lets the average follow the fast-moving early weights (``d_1 ~ decay / tau``) and
reaches ``decay`` after a few ``tau`` steps; ``tau = 0`` uses ``decay`` from the first step.
Only applied steps count: the trainer calls :meth:`ModelEMA.update` after an optimizer step that
was taken, never after a skipped non-finite one.

What is averaged: every floating-point entry of the model's state dict, the parameters AND the
BatchNorm running mean / variance. The running statistics are averaged rather than copied
because they must describe the activations of the averaged weights: the raw model's statistics
follow the raw weights of the last few dozen steps, which the average lags behind by about
``1 / (1 - decay)`` steps (the choice of YOLOv5/v8 and timm's ``ModelEmaV2``; recomputing
exact statistics for the averaged weights would need a pass over data). Frozen statistics
(``norm_eval``) do not change, and a lerp between equal values leaves them exact. Integer
buffers (BatchNorm's ``num_batches_tracked``) are copied.

The update is two batched kernels per dtype group, with the decay computed on the host from the
step count: no host sync. In a distributed run every rank holds its own average; the
parameters are identical on every rank after the gradient all-reduce, so the averages are too,
with no extra communication (BatchNorm statistics, unsynchronised without ``sync_bn``, are per
rank as in the raw model; rank 0's are saved).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from kdctl.artifact.checkpoint import load_model_weights
from kdctl.errors import KdctlError


class ModelEMA:
    """The moving average of ``model``'s weights, held as a frozen copy :attr:`module` (in eval
    mode) that evaluation and checkpoints use as they would use ``model``.

    Args:
        model: the trained module. Its state-dict tensors are bound here, once: the optimizer
            and ``load_state_dict`` change them in place, so later updates read them directly.
        decay: the final decay ``d`` (0 <= d < 1).
        tau: steps of the ramp ``1 - exp(-n / tau)``; 0: no ramp.
    """

    def __init__(self, model: nn.Module, decay: float, tau: float):
        if not 0.0 <= decay < 1.0 or tau < 0:
            raise ValueError(f"ModelEMA needs 0 <= decay < 1 and tau >= 0, got decay={decay}, tau={tau}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.tau = float(decay), float(tau)
        self.updates = 0  # optimizer steps averaged so far
        ema, raw = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        seen: set[int] = set()
        self._float: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._other: tuple[list[Tensor], list[Tensor]] = ([], [])
        for key, tensor in raw.items():
            if id(tensor) in seen:  # a tied tensor is averaged once
                continue
            seen.add(id(tensor))
            group = self._float if tensor.is_floating_point() else self._other
            group[0].append(ema[key].data)
            group[1].append(tensor.data)

    def decay_at(self, n: int) -> float:
        """``d_n = decay * (1 - exp(-n / tau))`` (``decay`` when ``tau`` is 0)."""
        return self.decay * (1.0 - math.exp(-n / self.tau)) if self.tau > 0 else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Average in the model's current weights: ``ema = d_n ema + (1 - d_n) weights`` for the
        floating-point tensors, a copy for the integer ones. Call after each applied step."""
        self.updates += 1
        torch._foreach_lerp_(self._float[0], self._float[1], 1.0 - self.decay_at(self.updates))
        if self._other[0]:
            torch._foreach_copy_(self._other[0], self._other[1])

    def train_state(self, model: nn.Module) -> dict:
        """What resuming needs besides the averaged weights (which the checkpoint's safetensors
        hold): the update count and ``model``'s raw training weights (CPU copies)."""
        return {"updates": self.updates,
                "weights": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}

    def load_train_state(self, model: nn.Module, state: dict | None, source: str) -> None:
        """Restore :meth:`train_state` into ``model`` (the raw weights) and the update count;
        the averaged weights are loaded into :attr:`module` from the checkpoint by the caller."""
        if not isinstance(state, dict) or "weights" not in state:
            raise KdctlError(f"{source}: holds no train.ema state (saved with train.ema off); "
                             f"resume with the recipe the run was saved with")
        load_model_weights(model, state["weights"], source)
        self.updates = int(state["updates"])


def build_ema(model: nn.Module, cfg) -> ModelEMA | None:
    """A :class:`ModelEMA` of ``model`` for the recipe's ``train.ema`` section, None when off."""
    return None if cfg is None else ModelEMA(model, cfg.decay, cfg.tau)
