"""kdctl's tables that recipe fields name, read on first use so that importing :mod:`kdctl.recipe`
imports no torch."""
from __future__ import annotations


def families() -> dict:
    """kdctl's detector families (:data:`kdctl.models.families.FAMILIES`), imported on first use."""
    from kdctl.models.families import FAMILIES

    return FAMILIES
