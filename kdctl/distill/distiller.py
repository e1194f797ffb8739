"""The :class:`Distiller`: a student, a frozen teacher and the KD methods of ``distill.losses``.

One training step (:meth:`Distiller.forward`):

1. student: backbone + FPN, then the head; with CrossKD the head also returns each branch's
   pre-activation tower output at ``reuse_idx`` (:func:`kdctl.distill.crosskd.run_head`);
2. teacher, under ``torch.inference_mode`` and its own autocast (``distill.teacher_amp``:
   bf16 on CUDA by default): backbone + FPN, and the head when a prediction method (crosskd,
   pred_mimic) needs it; its outputs are cloned out of inference mode (autograd may save
   them: inference tensors cannot be saved for backward);
3. the student's detection losses on its own predictions (one assignment, shared with the KD
   losses); the student's head gets gradient only from these;
4. each KD method's losses, named ``loss_crosskd_cls``, ``loss_ssim``, ...

The teacher is frozen: ``requires_grad=False``, always in eval mode (``train()`` on the
distiller leaves it there), outside the optimizer and outside the student's checkpoint. It is
*not* a submodule: the distiller's parameters and buffers are the student's and the adapters'
only, which is what DDP wraps in a distributed run (the teacher is replicated on every rank and
never synchronised). ``.to()`` / ``.cuda()`` on the distiller still move it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdctl.distill.crosskd import CrossKD, run_head
from kdctl.distill.feature import FeatureKD
from kdctl.distill.prediction import prediction_kd
from kdctl.models.detector import Detector

Reduce = Callable[[Tensor], Tensor]


class Distiller(nn.Module):
    """Args:
        student: the detector being trained.
        teacher: a trained detector with the same classes; frozen here.
        losses: ``recipe.distill.losses`` (pair already checked by :func:`kdctl.recipe.pair_problem`).
    """

    def __init__(self, student: Detector, teacher: Detector | None, losses: list, *,
                 teacher_amp: torch.dtype | None = None):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # plain attribute: not a submodule (see above)
        self.teacher_amp = teacher_amp
        self.losses_cfg = list(losses)
        kinds = {c.type for c in self.losses_cfg}
        if kinds and teacher is None:
            raise ValueError("distillation losses need a teacher")
        self.crosskd_cfg = next((c for c in self.losses_cfg if c.type == "crosskd"), None)
        self.mimic_cfg = next((c for c in self.losses_cfg if c.type == "pred_mimic"), None)
        self.crosskd = None
        if self.crosskd_cfg is not None:
            c = self.crosskd_cfg
            self.crosskd = CrossKD(student.head_name, student.head, teacher.head, c.reuse_idx, c.adapter)
        self.features = nn.ModuleList(
            FeatureKD(c, student.neck.out_channels, teacher.neck.out_channels, student.neck.num_outs)
            for c in self.losses_cfg if c.type in ("ssim", "pkd", "feat_l2", "feat_l1")
        )
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            # the batch is normalised with the student's mean/std; map it to the teacher's
            s_mean, s_std = torch.tensor(student.mean), torch.tensor(student.std)
            t_mean, t_std = torch.tensor(teacher.mean), torch.tensor(teacher.std)
            self.renormalize = not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
            self.register_buffer("_t_scale", (s_std / t_std).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("_t_shift", ((s_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)

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
        """The learnable KD parts (adapters): optimised with the student, saved in the training
        state for resume, never in the student's checkpoint."""
        parts = nn.ModuleDict()
        if self.crosskd is not None:
            parts["crosskd"] = self.crosskd
        parts["features"] = self.features
        return parts

    # ------------------------------------------------------------------ step
    def teacher_input(self, images: Tensor) -> Tensor:
        if not self.renormalize:
            return images
        return images * self._t_scale.to(images.dtype) + self._t_shift.to(images.dtype)

    def forward(self, batch, reduce: Reduce = lambda t: t) -> dict[str, Tensor]:
        s, t = self.student, self.teacher
        reuse = self.crosskd.reuse_idx if self.crosskd is not None else 0
        s_feats = s.features(batch.images)
        s_out, s_mid = run_head(s.head, s_feats, reuse) if self.crosskd is not None else (s.head(s_feats), None)
        t_feats = t_out = t_mid = None
        if t is not None and self.losses_cfg:
            with torch.inference_mode(), self._teacher_autocast(batch.images.device):
                t_feats = t.features(self.teacher_input(batch.images))
                if self.crosskd is not None or self.mimic_cfg is not None:
                    t_out, t_mid = run_head(t.head, t_feats, reuse)
            t_feats, t_out, t_mid = _out_of_inference((t_feats, t_out, t_mid))

        priors = s.priors(s_out)
        assignment = s.criterion.assign(priors, batch)
        losses = s.criterion.loss(s.flat_outputs(s_out), priors, batch, reduce, assignment)
        if t_out is not None:
            t_flat = t.flat_outputs(t_out)
        if self.crosskd is not None:
            c = self.crosskd_cfg
            cross = t.flat_outputs(self.crosskd.cross_predictions(s_mid, t_mid, t.head))
            losses.update(prediction_kd(s.head_name, s.criterion, cross, t_flat, priors, assignment,
                                        prefix="loss_crosskd", weight=c.weight, cls_weight=c.cls_weight,
                                        reg_weight=c.reg_weight, temperature=c.temperature, beta=c.beta, reduce=reduce))
        if self.mimic_cfg is not None:
            c = self.mimic_cfg
            losses.update(prediction_kd(s.head_name, s.criterion, s.flat_outputs(s_out), t_flat, priors, assignment,
                                        prefix="loss_mimic", weight=c.weight, cls_weight=c.cls_weight,
                                        reg_weight=c.reg_weight, temperature=c.temperature, beta=c.beta, reduce=reduce))
        for feature in self.features:
            losses.update(feature(s_feats, t_feats))
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
