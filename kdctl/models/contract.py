"""The meta-architecture contract: what every detector offers the rest of kdctl.

The engine, evaluation, export, predict, the hub and the KD methods see a detector only through
this class. Its raw outputs are opaque to them: they pass them back to the detector (``loss``,
``postprocess``, ``raw_tuple``) and never look inside. Everything a meta-architecture needs to
train and infer (priors, assigners, box coders for a dense detector; proposals and RoI samplers
for a two-stage one; Hungarian matching for a set-prediction one) lives behind it. As
detectron2's ``meta_arch`` and DETR's model / criterion / postprocess split: the model hides its
layout, the world sees named losses and :class:`~kdctl.models.postprocess.Detections`.

What a detector offers (:class:`MetaArchitecture`):

- ``forward(images)`` -> raw outputs (normalised ``[B, 3, H, W]`` images in);
- ``loss(raw, batch, reduce)`` -> named weighted losses (``loss_cls``, ``loss_bbox``, ...);
- ``postprocess(raw, valid_sizes, scales, ...)`` / ``predict(images, ...)`` -> detections in
  original-image pixels; ``postprocess_rules`` (default NMS IoU, score rule, empty-box rule:
  what an exported file records);
- ``end_to_end_candidates(size, ...)``: the module the end-to-end export graph runs (images of
  one size -> boxes, scores, labels, keep), before its class-wise NMS;
- ``compiled_parts()``: the submodules ``runtime.compile`` may compile;
- the export tensor path: ``raw_names()``, ``raw_tuple(raw)``, ``raw_from_tuple(outputs)``
  (a flat tuple of named tensors and back);
- class-row surgery for ``init_from`` and ``distill.class_map``: ``classifier_keys()``,
  ``class_rows(classes, num_classes)``, ``keep_classes(index)``;
- distillation surfaces, as named :data:`CAPABILITIES`: ``taps(images, ...)`` gives one
  forward's surfaces and ``detection_losses(taps, batch, reduce)`` the losses with what they
  computed (the assignment) for the KD methods to share. A KD method declares the capabilities
  it needs (:attr:`kdctl.distill.kd.KDMethod.needs`); the pair check asks the families'
  capabilities, never their layout.

:class:`~kdctl.models.detector.Detector` (backbone + neck + dense head) is the dense
implementation. docs/architecture.md ("Adding a meta-architecture") sketches the two-stage and
set-prediction ones.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

NECK = "neck"
DENSE_OUTPUTS = "dense_outputs"
DENSE_TOWER = "dense_tower"
ROI = "roi"
QUERIES = "queries"

# capability -> what a detector that has it offers the KD methods
CAPABILITIES: dict[str, str] = {
    NECK: "multi-level neck features (Taps.neck, finest first) with neck.strides / neck.out_channels / neck.num_outs",
    DENSE_OUTPUTS: "per-prior predictions: flat_outputs, the student's priors and assignment, decoder, family.kd",
    DENSE_TOWER: "head towers with forward_tower / forward_from and Taps.tower at a tower index (CrossKD)",
    ROI: "(reserved: two-stage) RoI features of sampled proposals and the RoI head's remaining layers",
    QUERIES: "(reserved: set prediction) decoder queries and their matched predictions",
}

DENSE_CAPABILITIES = frozenset({NECK, DENSE_OUTPUTS, DENSE_TOWER})  # what a one-stage dense detector offers

Reduce = Callable[[Tensor], Tensor]


@dataclass
class Taps:
    """One forward pass with the surfaces the KD methods read.

    neck   the neck levels ``[B, C_l, H_l, W_l]``, finest first (:data:`NECK`)
    raw    the raw outputs, as ``forward`` returns them (None when the head was not run)
    tower  ``{"cls": [per level], "reg": [...]}`` pre-activation tower features at the requested
           index (:data:`DENSE_TOWER`; None unless asked for)
    """

    neck: list[Tensor]
    raw: Any = None
    tower: dict[str, list[Tensor]] | None = None


@dataclass
class DenseShared:
    """What a dense detector's detection losses computed that its KD methods reuse: the
    flattened predictions (``{"cls": [B, N, K], ...}``), the priors and the one assignment."""

    flat: dict[str, Tensor]
    priors: Any
    assignment: Any


class MetaArchitecture(nn.Module):
    """Base of every detector kdctl trains; see the module docstring. Subclasses set
    :attr:`capabilities` and implement the methods; ``mean`` / ``std`` are the input
    normalisation (RGB in [0, 1]) and ``num_classes`` K."""

    capabilities: frozenset[str] = frozenset()
    mean: Sequence[float]
    std: Sequence[float]

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Any:
        raise NotImplementedError

    def loss(self, raw: Any, batch, reduce: Reduce = lambda t: t) -> dict[str, Tensor]:
        raise NotImplementedError

    def postprocess(self, raw: Any, valid_sizes: Tensor, scales: Tensor, **kwargs):
        raise NotImplementedError

    def predict(self, images: Tensor, valid_sizes: Tensor, scales: Tensor, **kwargs):
        raise NotImplementedError

    @property
    def postprocess_rules(self) -> dict:
        raise NotImplementedError

    def compiled_parts(self) -> list[nn.Module]:
        raise NotImplementedError

    def end_to_end_candidates(self, size: tuple[int, int], *, score_thr: float, topk_pre_nms: int) -> nn.Module:
        raise NotImplementedError

    def raw_names(self) -> list[str]:
        raise NotImplementedError

    def raw_tuple(self, raw: Any) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def raw_from_tuple(self, outputs: Sequence) -> Any:
        raise NotImplementedError

    def classifier_keys(self) -> list[str]:
        raise NotImplementedError

    def class_rows(self, classes: Sequence[int], num_classes: int | None = None) -> Tensor:
        raise NotImplementedError

    def keep_classes(self, index: Sequence[int]) -> None:
        raise NotImplementedError

    def taps(self, images: Tensor, *, head: bool = True, tower_idx: int | None = None) -> Taps:
        raise NotImplementedError

    def detection_losses(self, taps: Taps, batch, reduce: Reduce = lambda t: t) -> tuple[dict[str, Tensor], Any]:
        raise NotImplementedError


def missing_capabilities(needs: frozenset[str], have: frozenset[str]) -> list[str]:
    """The capabilities of ``needs`` that ``have`` lacks, sorted."""
    return sorted(needs - have)
