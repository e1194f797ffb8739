"""Detector families: one module each, collected in :data:`FAMILIES` (a plain dict).

The recipe's ``model.*.head`` choices, ``kdctl recipes families`` and the family table in
docs/architecture.md are derived from this dict; adding a family is its module plus one line
here (docs/architecture.md, "Adding a detector family").
"""
from kdctl.errors import KdctlError
from kdctl.models.families import atss, fcos, gfl, retinanet, yolo
from kdctl.models.families.family import DetectionLoss, Family, PredictionKD

FAMILIES: dict[str, Family] = {
    "gfl": gfl.FAMILY,
    "atss": atss.FAMILY,
    "retinanet": retinanet.FAMILY,
    "fcos": fcos.FAMILY,
    "yolo": yolo.FAMILY,
}


def get_family(name: str) -> Family:
    """The family called ``name``; KdctlError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KdctlError(f"unknown detector family {name!r}; use one of {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "DetectionLoss", "Family", "PredictionKD", "get_family"]
