"""One-line recipe errors from pydantic's ``ValidationError``: ``FILE: dotted.key: problem``.

Config-agnostic: the root section class and the tags of its discriminated unions are arguments
(:func:`kdctl.recipe.validate_raw` passes ``Recipe`` and ``METHOD_NAMES``), so this module
needs nothing from :mod:`kdctl.recipe` and the two do not import each other.
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Collection, Union

from pydantic import BaseModel, ValidationError


def format_validation_error(exc: ValidationError, source: str, root: type[BaseModel], tags: Collection[str]) -> str:
    """One line: ``FILE: dotted.key: problem`` (+ how many more problems there are).

    ``root`` is the validated section class (an unknown key is matched against the keys of the
    section it is in); ``tags`` are the ``type`` values of its discriminated unions (pydantic
    puts them into error locations; they are left out of the dotted key)."""
    errors = exc.errors()
    err = errors[0]
    loc = tuple(err["loc"])
    path = _dotted(loc, tags)
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(root, loc)
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean {'.'.join([*path.split('.')[:-1], close[0]])!r}?" if close else f"valid keys here: {', '.join(valid)}"
        msg = f"unknown key {path!r}; {hint}"
    elif kind == "missing":
        msg = f"{path}: required key is missing"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        msg = f"{path}: `type` must be one of {', '.join(tags)}"
    else:
        text = err["msg"]
        text = text[0].lower() + text[1:] if text else text
        text = text.replace("input should be", "expected").replace("value error, ", "")
        got = err.get("input")
        shown = "" if kind == "value_error" or isinstance(got, (dict, list)) else f" (got {got!r})"
        msg = text if not path or text.startswith(path) else f"{path}: {text}{shown}"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {msg}{more}"


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional / Union / Annotated / list annotations."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, getattr(types, "UnionType", Union), list):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a)]
    return [annotation]


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section class that owns the last key of ``loc`` (following list indices and
    discriminated-union tags as pydantic reports them), starting from ``root``."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        tag = model.model_fields.get("type")
        if tag is not None and part in typing.get_args(tag.annotation):
            continue  # a discriminated-union tag pydantic put in the location
        if part in model.model_fields:
            candidates = [t for t in _unwrap(model.model_fields[part].annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
            model = candidates[0] if len(candidates) == 1 else (_pick_tagged(candidates, loc) if candidates else None)
        else:
            return None
    return model


def _pick_tagged(candidates: list[type[BaseModel]], loc: tuple) -> type[BaseModel] | None:
    """The member of a discriminated union whose ``type`` tag appears in ``loc``, or None."""
    for part in loc:
        for cls in candidates:
            tag = cls.model_fields.get("type")
            if tag is not None and isinstance(part, str) and part in typing.get_args(tag.annotation):
                return cls
    return None


def _dotted(loc: tuple, tags: Collection[str]) -> str:
    """``loc`` as the dotted key a user writes (``distill.losses.0.weight``)."""
    # pydantic inserts the discriminator value into loc for tagged unions: drop it.
    tags = set(tags)
    parts, prev_int = [], False
    for part in loc:
        if prev_int and part in tags:
            prev_int = False
            continue
        prev_int = isinstance(part, int)
        parts.append(str(part))
    return ".".join(parts)
