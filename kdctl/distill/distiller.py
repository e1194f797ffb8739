"""The :class:`Distiller`: a student, a frozen teacher and a list of KD methods.

One training step (:meth:`Distiller.forward`):

1. student: backbone + neck, then the head; when a method reads "tower" (CrossKD) the head also
   returns each branch's pre-activation tower output at that index (:meth:`DenseHead.forward_with_tower`);
2. teacher, under ``torch.inference_mode`` and its own autocast (``distill.teacher_amp``:
   bf16 on CUDA by default): backbone + neck, and the head only when a method reads "head" or
   "tower"; its outputs are cloned out of inference mode (autograd may save them: inference
   tensors cannot be saved for backward);
3. the student's detection losses on its own predictions, with one assignment that the KD
   methods share; the student's head gets gradient only from these;
4. each method's losses (:class:`~kdctl.distill.methods.KDMethod`), named ``loss_crosskd_cls``,
   ``loss_ssim``, ...

The teacher is frozen: ``requires_grad=False``, always in eval mode (``train()`` on the
distiller leaves it there), outside the optimizer and outside the student's checkpoint. It is
*not* a submodule: the distiller's parameters and buffers are the student's and the methods'
(adapters) only, which is what DDP wraps in a distributed run (the teacher is replicated on
every rank and never synchronised). ``.to()`` / ``.cuda()`` on the distiller still move it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdctl.distill.kd import KDInputs, KDMethod
from kdctl.models.contract import DENSE_OUTPUTS, Taps
from kdctl.models.detector import Detector

Reduce = Callable[[Tensor], Tensor]


def input_map(student: Detector, teacher: Detector) -> tuple[Tensor, Tensor] | None:
    """``(scale, shift)`` (``[1, 3, 1, 1]`` each) that map images normalised with the student's
    mean/std to the teacher's (``x * scale + shift``), or None when they are the same."""
    s_mean, s_std = torch.tensor(student.mean), torch.tensor(student.std)
    t_mean, t_std = torch.tensor(teacher.mean), torch.tensor(teacher.std)
    if torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std):
        return None
    return (s_std / t_std).view(1, 3, 1, 1), ((s_mean - t_mean) / t_std).view(1, 3, 1, 1)


class Distiller(nn.Module):
    """Args:
        student: the detector being trained.
        teacher: a trained detector with the same classes; frozen here (None: no KD methods).
        methods: the KD methods (:func:`kdctl.distill.methods.build_kd_methods`).
        teacher_amp: the teacher's autocast dtype (None: the step's own; float32: off).
    """

    def __init__(self, student: Detector, teacher: Detector | None, methods: list[KDMethod], *,
                 teacher_amp: torch.dtype | None = None):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # plain attribute: not a submodule (see above)
        self.teacher_amp = teacher_amp
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"each KD method may appear once, got {names}")
        self.methods = nn.ModuleDict({m.name: m for m in methods})  # keys name the adapters in the resume state
        if methods and teacher is None:
            raise ValueError("distillation losses need a teacher")
        for m in methods:  # the pair check refused these earlier, from the recipe (kdctl.recipe.pairs)
            lacking = sorted(m.needs - (student.capabilities & teacher.capabilities))
            if lacking:
                raise ValueError(f"KD method {m.name!r} needs the capabilities {lacking} of both detectors")
        reads = {r for m in methods for r in m.reads}
        self.reads_head = bool(reads & {"head", "tower"})
        idx = {m.tower_idx for m in methods if "tower" in m.reads}
        if len(idx) > 1:
            raise ValueError(f"KD methods read the towers at different indices {sorted(idx)}")
        self.tower_idx = idx.pop() if idx else None
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            # the batch is normalised with the student's mean/std; map it to the teacher's
            mapping = input_map(student, teacher)
            self.renormalize = mapping is not None
            scale, shift = mapping if mapping is not None else (torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1))
            self.register_buffer("_t_scale", scale, persistent=False)
            self.register_buffer("_t_shift", shift, persistent=False)

    # ------------------------------------------------------------------ modules
    def _apply(self, fn, *args, **kwargs):
        # .to(device / dtype / memory format) moves the teacher with the student
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm statistics and everything else stay the teacher's
        return self

    def kd_modules(self) -> nn.ModuleDict:
        """The learnable KD parts (the methods' adapters): optimised with the student, saved in
        the training state for resume, never in the student's checkpoint."""
        return self.methods

    # ------------------------------------------------------------------ step
    def teacher_input(self, images: Tensor) -> Tensor:
        if not self.renormalize:
            return images
        return images * self._t_scale.to(images.dtype) + self._t_shift.to(images.dtype)

    def forward(self, batch, reduce: Reduce = lambda t: t) -> dict[str, Tensor]:
        s, t = self.student, self.teacher
        s_taps = s.taps(batch.images, tower_idx=self.tower_idx)
        t_taps = None
        if t is not None and len(self.methods):
            with torch.inference_mode(), self._teacher_autocast(batch.images.device):
                t_taps = t.taps(self.teacher_input(batch.images), head=self.reads_head,
                                tower_idx=(self.tower_idx or 0) if self.reads_head else None)
            t_taps = Taps(*_out_of_inference((t_taps.neck, t_taps.raw, t_taps.tower)))
        losses, shared = s.detection_losses(s_taps, batch, reduce)
        if len(self.methods):
            t_out = t_taps.raw
            # the teacher's flattened outputs once for every method that compares per-prior outputs
            t_flat = t.flat_outputs(t_out) if t_out and DENSE_OUTPUTS in t.capabilities else None
            inputs = KDInputs(s, t, s_taps.neck, t_taps.neck, s_taps.raw, t_out, t_flat, s_taps.tower, t_taps.tower,
                              reduce, shared)
            for method in self.methods.values():
                losses.update(method(inputs))
        return losses

    def _teacher_autocast(self, device: torch.device):
        """The teacher's own autocast (None: whatever autocast the step runs under)."""
        if self.teacher_amp is None:
            return contextlib.nullcontext()
        if self.teacher_amp == torch.float32:
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=self.teacher_amp)


def _out_of_inference(tree):
    """Clone the inference-mode tensors of a nested (list / tuple / dict) structure into normal
    tensors, in fp32 where autocast made them lower precision."""
    if isinstance(tree, Tensor):
        return tree.float() if tree.dtype in (torch.bfloat16, torch.float16) else tree.clone()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_out_of_inference(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _out_of_inference(v) for k, v in tree.items()}
    return tree
