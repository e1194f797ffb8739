"""Class names across datasets and checkpoints: the one matching rule that ``init_from``
(``model.*.init_class_map``, :mod:`kdctl.engine.transfer`) and distillation from a teacher with
other classes (``distill.class_map``, :mod:`kdctl.distill.class_map`) share.

Names match case-insensitively with ``_`` and runs of spaces read as one space (COCO's
"traffic light" is MMDetection's "traffic_light"); an exact name wins over a looser match.
Torch-free: recipe checks may use it.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from kdctl.errors import KdctlError


def class_key(name: str) -> str:
    """The form names are matched in: case folded, ``_`` read as a space, runs of spaces as one."""
    return " ".join(str(name).replace("_", " ").split()).casefold()


def nearest(name: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``candidates`` closest to ``name`` (difflib on :func:`class_key`), best first."""
    by_key: dict[str, str] = {}
    for c in candidates:
        by_key.setdefault(class_key(c), c)
    return [by_key[k] for k in difflib.get_close_matches(class_key(name), list(by_key), n=n, cutoff=0.5)]


def hint(name: str, candidates: Sequence[str]) -> str:
    """``(nearest: 'a', 'b')`` of :func:`nearest`, or ``(no close name)``."""
    close = nearest(name, candidates)
    return f"(nearest: {', '.join(map(repr, close))})" if close else "(no close name)"


class NameLookup:
    """Name -> index in ``names``: the exact name first, else the first name with its :func:`class_key`."""

    def __init__(self, names: Sequence[str]):
        self.exact = {n: i for i, n in reversed(list(enumerate(names)))}
        self.keyed = {class_key(n): i for i, n in reversed(list(enumerate(names)))}

    def get(self, name: str) -> int | None:
        return self.exact.get(name, self.keyed.get(class_key(name)))


def stored_class_names(meta: Mapping[str, str], source: str) -> list[str] | None:
    """The class names a kdctl checkpoint's metadata lists (``classes``, newline-joined, as
    training checkpoints, exports and ``kdctl fetch`` conversions write them), or None. KdctlError
    naming ``source`` when they disagree with its ``num_classes``."""
    text = meta.get("classes")
    if not text:
        return None
    names = text.split("\n")
    count = meta.get("num_classes")
    if count and str(count).isdigit() and int(count) != len(names):
        raise KdctlError(f"{source}: metadata lists {len(names)} classes but num_classes is {count}; "
                         "the file is damaged or hand-edited: export or convert it again")
    return names


def map_classes(ours: Sequence[str], theirs: Sequence[str], setting: str | Mapping[str, str], *, key: str,
                side: str, require_all: bool, advice: str = "") -> dict[int, int]:
    """Which of ``theirs`` (a checkpoint's or teacher's classes) each of ``ours`` (the dataset's)
    corresponds to: ``{our index: their index}``, in our order.

    ``setting``: ``"auto"`` (by name, see the module docstring), ``"none"`` (nothing), or a dict
    ``{our name: their name}`` whose pairs win and whose left-out classes are matched by name.
    ``require_all``: every class of ours must find one (distillation); otherwise the unmatched
    are left out (transfer: they start fresh). Each of theirs serves one of ours at most.

    Raises KdctlError (one line, starting with ``key``, the recipe field) naming an explicit
    name found on neither side, each of ours without a match (with ``side``'s nearest names)
    and a class of theirs chosen twice; ``advice`` ends the line of a missing match."""
    if setting == "none":
        return {}
    mine, other = NameLookup(ours), NameLookup(theirs)
    explicit: dict[int, int] = {}
    if isinstance(setting, Mapping):
        bad = [f"{k!r} is not a dataset class {hint(k, ours)}" for k in setting if mine.get(k) is None]
        bad += [f"{k!r}: {v!r} is not a {side} class {hint(v, theirs)}"
                for k, v in setting.items() if other.get(v) is None]
        if bad:
            raise KdctlError(f"{key}: {'; '.join(bad)}; fix the names (keys: dataset classes, values: the {side}'s)")
        explicit = {mine.get(k): other.get(v) for k, v in setting.items()}
    found = {i: explicit.get(i, other.get(name)) for i, name in enumerate(ours)}
    missing = [ours[i] for i, j in found.items() if j is None]
    if missing and require_all:
        listed = [f"{name!r} {hint(name, theirs)}" for name in missing]
        raise KdctlError(f"{key}: {len(missing)} dataset class(es) have no class among the {side}'s {len(theirs)}: "
                         f"{', '.join(listed)}; map each in {key} as {{dataset class: {side} class}}"
                         + (f", or {advice}" if advice else ""))
    pairs = {i: j for i, j in found.items() if j is not None}
    chosen: dict[int, list[str]] = {}
    for i, j in pairs.items():
        chosen.setdefault(j, []).append(ours[i])
    twice = [f"{theirs[j]!r} (for {', '.join(map(repr, names))})" for j, names in chosen.items() if len(names) > 1]
    if twice:
        raise KdctlError(f"{key}: {side} class(es) chosen for more than one dataset class: {', '.join(twice)}; "
                         f"give each dataset class its own {side} class")
    return pairs
