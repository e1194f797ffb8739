"""The base of every recipe section (:class:`Section`) and the on/off rule of optional sections."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


def on_off(value):
    """For an optional section: ``true`` means its defaults (``{}``), ``false`` means off (null)."""
    if isinstance(value, bool):
        return {} if value else None
    return value


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are re-validated."""

    # a number must be finite: `lr: .inf` or `--set train.lr=nan` is an error, not a run that diverges
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
