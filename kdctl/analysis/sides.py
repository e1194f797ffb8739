"""The detectors taking part in ``kdctl analyze-conflict`` (:mod:`kdctl.analysis.analyze`).

Each one is a :class:`Side`: the model, the mapping of the student's input normalisation to its
own (the distiller's, :func:`kdctl.distill.distiller.input_map`) and, for teachers of a
distilled student, the CrossKD pairing the student was trained with, so that its cross-head
predictions can be measured too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from kdctl.errors import KdctlError
from kdctl.models.contract import DENSE_OUTPUTS, DENSE_TOWER


@dataclass
class Side:
    """A detector taking part: the model, how its input is mapped from the student's
    normalisation, and where it came from."""

    label: str
    checkpoint: str | None
    model: object
    scale: Tensor | None = None  # [1, 3, 1, 1] or None (same normalisation as the student)
    shift: Tensor | None = None
    crosskd: object = None  # kdctl.distill.crosskd.CrossKD when cross-head predictions are measured
    levels: int | None = None  # read only the first this many neck levels (the student's; None: all)
    notes: list[str] = field(default_factory=list)

    def input(self, images: Tensor) -> Tensor:
        """``images`` ``[B, 3, H, W]`` in the student's normalisation -> this detector's."""
        return images if self.scale is None else images * self.scale + self.shift


# what the analysis reads of each detector: per-prior predictions and assignments, and for the
# CrossKD pairing the dense head towers (models.contract)
NEEDS = frozenset({DENSE_OUTPUTS, DENSE_TOWER})


def check_analysable(family: str, source) -> None:
    """KdctlError (one line naming ``source``) unless detectors of ``family`` have every capability
    the conflict analysis reads (:data:`NEEDS`): it compares dense per-location targets."""
    from kdctl.models.families import get_family

    lacking = sorted(NEEDS - get_family(family).capabilities)
    if lacking:
        raise KdctlError(f"{source}: analyze-conflict compares dense per-location targets and needs the detector "
                         f"capability {lacking[0]!r}, which the {family!r} family does not offer")


def load_teachers(paths: list[str], student: Side, stored_recipe, num_classes: int, device) -> list[Side]:
    """The teachers at ``paths`` (kdctl checkpoints) on ``device``, each renormalised from the
    student's input and, with a student checkpoint (``student.checkpoint``), paired with it
    through CrossKD as ``stored_recipe`` (the student checkpoint's recipe) says. Labels are the
    run folder and file name, numbered where two are the same."""
    from kdctl.artifact.stored import load_detector

    sides: list[Side] = []
    for path in paths:
        model, _, _ = load_detector(path, device=device)
        check_analysable(model.family.name, path)
        if model.num_classes != num_classes:
            raise KdctlError(f"{path}: the teacher predicts {model.num_classes} classes but the data has {num_classes}; "
                             "analyze on the data it was trained for")
        side = Side(_label(path), str(path), model, *_renorm(student.model, model, device))
        _student_levels(student.model, side)
        if student.checkpoint:
            _crosskd(student, stored_recipe, side)
        sides.append(side)
    labels = [s.label for s in sides]
    for i, s in enumerate(sides):  # same run name twice: tell them apart
        if labels.count(s.label) > 1:
            s.label = f"{s.label}#{i + 1}"
    return sides


def _student_levels(student, teacher: Side) -> None:
    """Read ``teacher`` on the student's neck levels only. The comparison is location by location
    on the student's grid, so a teacher with more levels (a P3-P7 GFL teacher of a P3-P5 yolo
    student) is read at the student's levels, with a note; one that lacks a student level is
    refused in one line (without this, the P6/P7 sizes reached the student's 3-stride prior
    generator and failed as an internal error)."""
    from kdctl.analysis.conflict import level_names

    s, t = list(student.strides), list(teacher.model.strides)
    if t == s:
        return
    if t[:len(s)] != s:
        raise KdctlError(f"{teacher.checkpoint}: the teacher's neck levels have strides {t} and the student's {s}; the "
                         "analysis compares them location by location on the student's grid, so the teacher needs every "
                         "student level: pick a teacher whose levels include the student's")
    teacher.levels = len(s)
    teacher.notes.append(f"the teacher's {', '.join(level_names(len(t))[len(s):])} (strides {t[len(s):]}) are not "
                         "compared: the student has no such level")


def _label(path: str) -> str:
    """``run/last`` for ``runs/run/last.safetensors``: the folder says which run it is."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem


def _renorm(student, teacher, device) -> tuple[Tensor | None, Tensor | None]:
    """The distiller's mapping of the student's input normalisation to the teacher's."""
    from kdctl.distill.distiller import input_map

    mapping = input_map(student, teacher)
    return (None, None) if mapping is None else (mapping[0].to(device), mapping[1].to(device))


def _crosskd(student: Side, stored_recipe, teacher: Side) -> None:
    """Attach CrossKD (reuse_idx and adapters as the student was trained) to ``teacher``, or a
    note saying why its cross-head predictions are skipped."""
    from kdctl.distill.crosskd import CrossKD
    from kdctl.artifact.checkpoint import resolve_checkpoint

    s, t = student.model, teacher.model
    if s.family.name != t.family.name:
        teacher.notes.append(f"cross-head predictions skipped: the analysis measures them for a teacher of the "
                             f"student's own family ({s.family.name!r}); this teacher is {t.family.name!r}")
        return
    cfg = next((c for c in stored_recipe.distill.losses if c.type == "crosskd"), None)
    reuse = s.family.reuse_idx if cfg is None or cfg.reuse_idx is None else cfg.reuse_idx
    if reuse > min(s.head.num_blocks, t.head.num_blocks):
        teacher.notes.append(f"cross-head predictions skipped: reuse_idx {reuse} is past the head towers")
        return
    module = CrossKD(s.head, t.head, s.family.kd, s.decoder, reuse, "auto" if cfg is None else cfg.adapter)
    if module.adapters is not None and not _load_adapters(module, student.checkpoint, teacher):
        return
    if cfg is None:
        teacher.notes.append("the student checkpoint's recipe has no crosskd loss: cross-head predictions use "
                             f"reuse_idx {reuse} through an untrained pairing")
    used = getattr(stored_recipe.model, "teacher_checkpoint", None)
    if used and Path(used).resolve() != resolve_checkpoint(teacher.checkpoint).resolve():
        teacher.notes.append(f"the student was distilled from {used}, not from this teacher")
    teacher.crosskd = module.to(next(t.parameters()).device).eval()


def _load_adapters(module, student_checkpoint: str, teacher: Side) -> bool:
    """Load the CrossKD adapters trained with the student into ``module``; False (and a note on
    ``teacher``) when they are not there."""
    from kdctl.artifact.checkpoint import load_train_state, resolve_checkpoint

    # the adapters are trained with the student but kept in its .state.pt, not its weights
    ckpt = resolve_checkpoint(student_checkpoint)
    name = ckpt.name.removesuffix(".safetensors")
    state_file = ckpt.with_name(name + ".state.pt")
    kd = {}
    if state_file.is_file():  # read with torch.load(weights_only=True)
        state = load_train_state(ckpt.parent, name, None)
        kd = {k.removeprefix("crosskd."): v for k, v in (state.get("extra", {}).get("kd", {}) or {}).items()
              if k.startswith("crosskd.")}
    if not kd:
        teacher.notes.append(f"cross-head predictions skipped: the head widths differ, and the adapters trained "
                             f"with the student are not in {state_file}")
        return False
    module.load_state_dict(kd)
    return True
