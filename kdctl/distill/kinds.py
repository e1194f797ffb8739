"""The KD methods by recipe ``type``: which class implements each, and so which detector
capabilities it needs (:attr:`~kdctl.distill.kd.KDMethod.needs`). The pair check
(:func:`kdctl.recipe.pairs.pair_problem`) asks this table before any model is built; it reads no
recipe, so the recipe package may import it."""
from __future__ import annotations

from kdctl.distill.crosskd import CrossKD
from kdctl.distill.feature import FeatureKD
from kdctl.distill.kd import KDMethod
from kdctl.distill.prediction import PredictionMimic

METHOD_CLASSES: dict[str, type[KDMethod]] = {
    "crosskd": CrossKD, "pred_mimic": PredictionMimic,
    "ssim": FeatureKD, "pkd": FeatureKD, "feat_l2": FeatureKD, "feat_l1": FeatureKD,
}


def needs(kind: str) -> frozenset[str]:
    """The capabilities the KD method ``kind`` (a recipe ``type``) needs on both detectors."""
    return METHOD_CLASSES[kind].needs
