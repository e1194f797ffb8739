"""Dense detection heads: towers + predictors returning raw per-level tensors (never losses).

``HEADS`` maps the recipe's ``model.*.head`` names to the classes.
"""
from kdctl.models.heads.atss import ATSSHead
from kdctl.models.heads.base import DenseHead, Scale
from kdctl.models.heads.fcos import FCOSHead
from kdctl.models.heads.gfl import GFLHead
from kdctl.models.heads.retina import RetinaHead

HEADS: dict[str, type[DenseHead]] = {"retinanet": RetinaHead, "fcos": FCOSHead, "atss": ATSSHead, "gfl": GFLHead}

__all__ = ["ATSSHead", "DenseHead", "FCOSHead", "GFLHead", "HEADS", "RetinaHead", "Scale"]
