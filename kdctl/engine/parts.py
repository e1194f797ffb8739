"""What a trainer trains (:class:`TrainParts`) and the plain detector's step module."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdctl.engine import distributed as dist


@dataclass
class TrainParts:
    """What a trainer trains, built in one place (:meth:`Trainer.build_parts`).

    model     the module checkpoints store (``kdctl eval`` / export read it)
    step      ``forward(batch, reduce)`` -> the batch's named losses; DDP wraps it, so it holds
              every parameter that learns (``model`` and ``extra``)
    extra     learnable parts used in training only (KD adapters): optimised with ``model``,
              saved in the ``.state.pt`` for resume, never in the checkpoint; or None
    compiled  the modules ``runtime.compile`` compiles
    info      what the run's plan shows about how they were built (``init``: what
              ``init_from`` loaded; ``class_map``: the teacher's classes used for each student class)
    """

    model: torch.nn.Module
    step: torch.nn.Module
    extra: torch.nn.Module | None = None
    compiled: list[torch.nn.Module] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class DetectorStep(torch.nn.Module):
    """``forward(batch, reduce)`` -> the detector's named losses: the one call DDP wraps."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, reduce=dist.reduce_mean) -> dict[str, torch.Tensor]:
        return self.model.loss(self.model(batch.images), batch, reduce)
