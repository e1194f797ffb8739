"""The KD-method interface: what a KD method reads of a step and what it returns.

A KD method is a small ``nn.Module`` (it may hold learnable adapters) that declares what it
reads of a step and returns named losses:

- ``reads``: a subset of ``{"neck", "head", "tower"}`` — the neck levels of both detectors, the
  head outputs of both, the pre-activation tower features at ``tower_idx`` of both;
- ``forward(inputs: KDInputs) -> {"loss_<name>...": Tensor}``.

:class:`~kdctl.distill.distiller.Distiller` runs the teacher only as far as the methods read,
then loops over them. Adding a method: a recipe section class (its ``type`` literal is its name:
the names exist only there, :data:`kdctl.recipe.METHOD_NAMES`), a module with the method, and
one entry in :func:`kdctl.distill.methods.build_kd_methods` (docs/architecture.md, "Adding a KD
method").
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from kdctl.models.assigners import Assignment
from kdctl.models.priors import Priors

Reduce = Callable[[Tensor], Tensor]
READS = ("neck", "head", "tower")


@dataclass
class KDInputs:
    """What one training step hands the KD methods (student ``s_*``, teacher ``t_*``).

    s_feats, t_feats   neck levels ``[B, C, H_l, W_l]``, finest first
    s_out, t_out       raw per-level head outputs (``t_out`` None unless a method reads "head")
    t_flat             the teacher's, flattened (``Detector.flat_outputs``: ``{"cls": [B, N, K], ...}``);
                       a method flattens ``s_out`` itself (its own graph node, so gradients
                       accumulate per loss as they always have: bit-identical runs)
    s_mid, t_mid       ``{"cls": [per level], "reg": [...]}`` pre-activation tower features at
                       the methods' ``tower_idx`` (None unless a method reads "tower")
    reduce             the all-reduce mean of averaging factors (identity on one process)
    shared             what the student's ``detection_losses`` shares with the KD methods
                       (``DenseShared`` for a dense student); ``priors`` and ``assignment`` read
                       it: the student's priors and its one assignment of this batch
    student, teacher   the two detectors (their heads, decoders, ``flat_outputs``)
    """

    student: nn.Module
    teacher: nn.Module
    s_feats: list[Tensor]
    t_feats: list[Tensor]
    s_out: dict[str, list[Tensor]]
    t_out: dict[str, list[Tensor]] | None
    t_flat: dict[str, Tensor] | None
    s_mid: dict[str, list[Tensor]] | None
    t_mid: dict[str, list[Tensor]] | None
    reduce: Reduce
    shared: Any

    @property
    def priors(self) -> Priors:
        return self.shared.priors

    @property
    def assignment(self) -> Assignment:
        return self.shared.assignment


class KDMethod(nn.Module):
    """Base of the KD methods. Subclasses set ``name`` (the recipe's ``type``), ``reads``,
    ``needs`` (the :data:`~kdctl.models.contract.CAPABILITIES` both detectors must have; the pair
    check and the :class:`~kdctl.distill.distiller.Distiller` ask them) and, when they read
    "tower", ``tower_idx``; ``forward(inputs)`` returns named losses."""

    name: str = ""
    reads: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()  # the detector capabilities it needs on both sides (models.contract)
    tower_idx: int = 0

    def forward(self, inputs: KDInputs) -> dict[str, Tensor]:
        raise NotImplementedError


