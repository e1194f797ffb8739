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


def format_validation_error(exc: ValidationError, source: str, root: type[BaseModel], tags: Collection[str],
                            section_tags: Collection[str] = ()) -> str:
    """One line: ``FILE: dotted.key: problem`` (+ how many more problems there are).

    ``root`` is the validated section class (an unknown key is matched against the keys of the
    section it is in); ``tags`` are the ``type`` values of its discriminated list unions and
    ``section_tags`` the ``section_tag`` class values of its discriminated section unions (the
    detector sections); pydantic puts both into error locations, and they are left out of the
    dotted key."""
    errors = exc.errors()
    err = errors[0]
    loc = tuple(err["loc"])
    path = _dotted(loc, tags, section_tags)
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(root, loc, section_tags)
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


def _model_at(root: type[BaseModel], loc: tuple, section_tags: Collection[str] = ()) -> type[BaseModel] | None:
    """The section class that owns the last key of ``loc`` (following list indices and
    discriminated-union tags as pydantic reports them), starting from ``root``."""
    model: type[BaseModel] | None = root
    tagged = False  # the section union's tag was just passed (the next part is a key of that section)
    for part in loc[:-1]:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        tag = model.model_fields.get("type")
        if tag is not None and part in typing.get_args(tag.annotation):
            continue  # a discriminated-union tag pydantic put in the location
        if part in section_tags and getattr(model, "section_tag", None) == part and not tagged:
            tagged = True
            continue  # the section union's tag, after the field that holds the union
        tagged = False
        if part in model.model_fields:
            candidates = [t for t in _unwrap(model.model_fields[part].annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
            model = candidates[0] if len(candidates) == 1 else (_pick_tagged(candidates, loc) if candidates else None)
        else:
            return None
    return model


def _pick_tagged(candidates: list[type[BaseModel]], loc: tuple) -> type[BaseModel] | None:
    """The member of a discriminated union whose ``type`` tag (or ``section_tag``) appears in
    ``loc``, or None."""
    for part in loc:
        for cls in candidates:
            tag = cls.model_fields.get("type")
            if tag is not None and isinstance(part, str) and part in typing.get_args(tag.annotation):
                return cls
            if isinstance(part, str) and getattr(cls, "section_tag", None) == part:
                return cls
    return None


def _dotted(loc: tuple, tags: Collection[str], section_tags: Collection[str] = ()) -> str:
    """``loc`` as the dotted key a user writes (``distill.losses.0.weight``)."""
    # pydantic inserts the discriminator value into loc for tagged unions: drop it (a list
    # union's after the index, a section union's after the field: model.student.<tag>.key)
    tags, section_tags = set(tags), set(section_tags)
    parts, prev_int, prev_tag = [], False, False
    for i, part in enumerate(loc):
        if prev_int and part in tags:
            prev_int = False
            continue
        if part in section_tags and i > 0 and not isinstance(loc[i - 1], int) and not prev_tag:
            prev_tag = True  # once: a section key may have its family's name (model.student.yolo.yolo.width)
            continue
        prev_int, prev_tag = isinstance(part, int), False
        parts.append(str(part))
    return ".".join(parts)
