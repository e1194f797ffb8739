"""Recipe files: the built-in recipes, reading YAML, ``extends`` chains and ``--set`` overrides.

Everything here works on raw mappings (what ``yaml.safe_load`` gives); the typed tree and its
validation are :mod:`kdctl.recipe`, which re-exports these functions.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from kdctl.errors import RecipeError, load_yaml, read_text


def recipes_dir() -> Path:
    """Folder of the built-in recipes (``$KDCTL_RECIPES`` overrides)."""
    env = os.environ.get("KDCTL_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> file."""
    folder = recipes_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file from a path or a built-in name; RecipeError with suggestions otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    known = builtin_recipes()
    if str(name_or_path) in known:
        return known[str(name_or_path)]
    close = difflib.get_close_matches(str(name_or_path), list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise RecipeError(f"{name_or_path}: no such recipe file or built-in recipe; {hint}see `kdctl recipes list`")


# keys of an Ultralytics data.yaml, and those only a kdctl recipe has (``train`` is in both: a
# path or list in a data.yaml, a mapping in a recipe)
DATA_YAML_KEYS = frozenset({"path", "train", "val", "test", "names", "nc", "download"})
RECIPE_ONLY_KEYS = frozenset({"extends", "description", "data", "model", "distill", "eval", "runtime"})


def is_data_yaml(raw) -> bool:
    """Whether a parsed YAML file is a YOLO dataset description rather than a kdctl recipe: it
    has a key of a data.yaml, no key only a recipe has, and ``train`` (if any) is not a mapping.
    One that lacks a required key is still a dataset file, so that reading it names the key."""
    if not isinstance(raw, dict) or not raw:
        return False
    keys = {str(k) for k in raw}
    return bool(keys & DATA_YAML_KEYS) and not keys & RECIPE_ONLY_KEYS and not isinstance(raw.get("train"), dict)


def _read_yaml(path: Path) -> dict:
    """The mapping in one recipe file (no ``extends``); RecipeError naming the file (and line)."""
    raw = load_yaml(read_text(path, "recipe", RecipeError), path, "recipe", RecipeError)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (data, model, ...), got {type(raw).__name__}")
    if is_data_yaml(raw):
        raise RecipeError(f"{path}: is a YOLO dataset description (data.yaml), not a recipe; give it as "
                          f"--data, or as data.path of a recipe with data.format: yolo")
    return raw


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``; mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The recipe's mapping with its ``extends`` chain merged (base first). ``extends`` is a path
    relative to the recipe file, or a built-in recipe name."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise RecipeError(f"{path}: `extends` forms a cycle ({cycle}); remove one link")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a file name or built-in recipe name, got {parent!r}")
    candidate = path.parent / parent
    base_path = candidate if candidate.is_file() else find_recipe(parent)
    return deep_merge(load_raw(base_path, (*_chain, path)), raw)


def apply_override(raw: dict, assignment: str) -> dict:
    """Apply one ``a.b.c=value`` to a raw mapping (value parsed as YAML, so ``3``, ``0.1``,
    ``true``, ``[8, 11]`` and ``null`` get their types; the schema then checks them). List items
    are addressed by index: ``distill.losses.0.weight=2``."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, for example --set train.epochs=24")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = text
    parts = key.strip().split(".")
    out = deep_merge(raw, {})
    node: Any = out
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is not an item of the list (it has {len(node)})")
            node[int(part)] = dict(node[int(part)]) if isinstance(node[int(part)], dict) else node[int(part)]
            node = node[int(part)]
            continue
        child = node.get(part)
        if isinstance(child, list):
            child = list(child)
        elif isinstance(child, dict):
            child = dict(child)
        else:
            child = {}
        node[part] = child
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"--set {key}: index {last} is out of range for a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value
    return out
