"""Loading a recipe: find the file, merge ``extends``, apply ``--set`` overrides, validate, and turn
pydantic's errors into one line (:mod:`kdctl.recipe.messages`)."""
from __future__ import annotations

import typing
from pathlib import Path

from pydantic import ValidationError

from kdctl.errors import RecipeError
from kdctl.recipe.files import apply_override, find_recipe, load_raw
from kdctl.recipe.messages import format_validation_error
from kdctl.recipe.detectors import SECTION_TAGS
from kdctl.recipe.sections import METHOD_NAMES, Recipe


def load_recipe(name_or_path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Load, merge ``extends``, apply ``--set`` overrides and validate. ``None`` gives the
    defaults. Raises RecipeError with one line naming the file and dotted key."""
    if name_or_path is None:
        path, raw = Path("<defaults>"), {}
    else:
        path = find_recipe(name_or_path)
        raw = load_raw(path)
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    return validate_raw(raw, str(path))


def validate_raw(raw: dict, source: str) -> Recipe:
    """``raw`` (a recipe mapping) validated as a :class:`Recipe`; RecipeError with one line
    naming ``source`` and the dotted key otherwise."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source, Recipe, METHOD_NAMES, SECTION_TAGS)) from None
