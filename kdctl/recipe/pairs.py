"""Whether a teacher/student pair can run the recipe's KD losses (:func:`pair_problem`): checked
when a recipe validates and again when the teacher checkpoint is read. Split from
:mod:`kdctl.recipe`, which re-exports these names."""
from __future__ import annotations

from kdctl.recipe.catalog import families



def output_methods() -> list[str]:
    """The KD methods that compare the two detectors' per-prior outputs: those that need the
    ``dense_outputs`` capability (crosskd, pred_mimic), in :data:`~kdctl.distill.kinds.METHOD_CLASSES`
    order. The dense output-space rules of :func:`pair_problem` apply to them."""
    from kdctl.distill.kinds import METHOD_CLASSES  # the method classes (torch): only when asked
    from kdctl.models.contract import DENSE_OUTPUTS

    return [kind for kind, cls in METHOD_CLASSES.items() if DENSE_OUTPUTS in cls.needs]


# variant fields that change how head outputs map to boxes (see VariantConfig)
DECODING_VARIANT = ("priors", "fcos_norm_on_bbox")


def pair_problem(student: DetectorConfig, teacher: DetectorConfig, losses: list) -> str | None:
    """Why this teacher/student pair cannot run ``losses`` (one line), or None.

    CrossKD runs the student's head features through the teacher's head and compares with the
    teacher's predictions, and prediction mimicking compares the two heads' outputs directly, so
    both need the same head type (same priors, anchors and regression format, and so the same neck
    levels: P3-P7, or P3-P5 for yolo). Widths may differ (an adapter maps them). CrossKD between
    two families is possible in one case (:func:`crosses_families`).
    Feature losses (ssim, pkd, feat_l2, feat_l1) work for any pair (on the levels both necks have).
    First of all, each method's needed capabilities (:func:`kdctl.distill.kinds.needs`) must be
    both families' (:attr:`Family.capabilities`); the rules after that are those of the dense
    output space, for the methods that compare per-prior outputs (:func:`output_methods`)."""
    problem = missing_capability(student, teacher, losses)
    if problem:
        return problem
    kinds = {item.type for item in losses}
    for kind in output_methods() if kinds else ():
        if kind == "crosskd" and kind in kinds and student.head != teacher.head and crosses_families(student, teacher):
            if any(item.reuse_idx != 0 for item in losses if item.type == "crosskd"):
                return (f"distill.losses: crosskd between two families (student {student.head!r}, teacher "
                        f"{teacher.head!r}) runs the student's neck features through the teacher's whole head: set "
                        "reuse_idx: 0 (--set distill.losses.N.reuse_idx=0), or use the same head on both sides")
            continue  # the teacher's outputs are compared in the teacher's own space: no variant to match
        if kind in kinds and student.head != teacher.head:
            across = (" (between two families only from a gfl or yolo teacher whose neck has every student level, at "
                      "reuse_idx 0)") if kind == "crosskd" else ""
            return (f"distill.losses: {kind} needs the same head on both sides{across}, but the student is "
                    f"{student.head!r} and the teacher {teacher.head!r}; use the same model.*.head or a "
                    "feature loss (ssim, pkd, feat_l2, feat_l1)")
        if kind in kinds:
            # the teacher's outputs are decoded with the student's priors and box coder
            for name in DECODING_VARIANT:
                s_v, t_v = getattr(student.variant, name), getattr(teacher.variant, name)
                if s_v != t_v:
                    return (f"distill.losses: {kind} decodes the teacher's outputs with the student's priors and "
                            f"box coding, but variant.{name} is {t_v!r} for the teacher and {s_v!r} for the "
                            f"student; set model.student.variant.{name}: {t_v!r} or use a feature loss")
    for item in losses:
        if item.type == "crosskd":
            idx = families()[student.head].reuse_idx if item.reuse_idx is None else item.reuse_idx
            depth = min(student.stacked_convs, teacher.stacked_convs)
            if idx > depth:
                return (f"distill.losses: crosskd reuse_idx {idx} is past the head towers "
                        f"(student {student.stacked_convs}, teacher {teacher.stacked_convs} blocks); use 0..{depth}")
        if getattr(item, "adapter", "auto") is False:
            s_w, t_w = _compared_widths(item, student, teacher)
            if s_w != t_w:
                return (f"distill.losses: {item.type} with adapter false needs equal widths, but the student "
                        f"has {s_w} channels and the teacher {t_w}; set adapter: auto")
    return None


def missing_capability(student: "DetectorConfig", teacher: "DetectorConfig", losses: list) -> str | None:
    """Why a method of ``losses`` cannot run on this pair by the capabilities it needs (one line:
    the first method, side and capability), or None."""
    from kdctl.distill.kinds import needs  # the method classes (torch): only when there are losses

    for item in losses:
        for side, cfg in (("student", student), ("teacher", teacher)):
            lacking = sorted(needs(item.type) - families()[cfg.head].capabilities)
            if lacking:
                return (f"distill.losses: {item.type} needs the detector capability {lacking[0]!r}, which the "
                        f"{side}'s family {cfg.head!r} does not offer; use a method its family offers (a feature "
                        "loss needs only 'neck')")
    return None


def crosses_families(student: DetectorConfig, teacher: DetectorConfig) -> bool:
    """Whether CrossKD can run between these two families. Across families (kdctl's extension;
    Wang et al. pair heads of one family) the student's neck features (``reuse_idx`` 0) run
    through the teacher's whole head and the KD losses live in the teacher's output space
    (:class:`kdctl.distill.crosskd.CrossKD`), over the student's levels. That needs a teacher
    family whose KD losses need no priors and that has one prior per location (GFL's and yolo's
    KD-QFL + distribution KL: the student's priors and box coder never meet the teacher's
    outputs, and both sides have the same rows per level), and every student level in the
    teacher's neck (both start at stride 8)."""
    fam = families()[teacher.head]
    levels_fit = families()[student.head].neck_levels <= fam.neck_levels
    one_prior = fam.anchors is None or fam.anchors[1] * len(fam.anchors[2]) == 1
    priorless = fam.kd.reg_loss == "kl" and not fam.kd.ctr_weight and fam.kd.norm == "num_pos"
    return one_prior and priorless and levels_fit


def _compared_widths(item, student: DetectorConfig, teacher: DetectorConfig) -> tuple[int, int]:
    kind = "fpn_channels"
    if item.type == "crosskd":
        idx = families()[student.head].reuse_idx if item.reuse_idx is None else item.reuse_idx
        kind = "feat_channels" if idx > 0 else kind
    # the built widths: a family section with a width multiplier (yolo.width) scales them
    return student.built_width(getattr(student, kind)), teacher.built_width(getattr(teacher, kind))
