"""Reading run directories: what a run trained, how far it got and how well it scored."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from kdctl.errors import KdctlError


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (lines cut short by a crash are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def summarize_run(run_dir: str | Path) -> dict:
    """One row describing a run: model, parameters, steps, throughput and its best evaluation.

    Keys: ``run``, ``model`` (student/teacher), ``head``, ``backbone``, ``params_m`` (millions,
    from ``last.safetensors``), ``steps``, ``img_s`` (median of the logged training rates),
    ``best`` (the metrics of the evaluation with the highest AP, or None), ``evals`` (count),
    ``train_s`` (seconds in training steps, evaluation excluded), ``distill`` (the KD methods of a
    ``kdctl distill`` run, "none" for its plain baseline; None for ``kdctl train``).
    """
    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise KdctlError(f"{run_dir}: not a kdctl run directory (no recipe.yaml); give the --out folder of `kdctl train`")
    recipe = yaml.safe_load(recipe_file.read_text()) or {}
    which, params, distill = "student", None, None
    weights = run_dir / "last.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            which, distill = meta.get("model", "student"), meta.get("distill")
            params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys()
                         if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    model = (recipe.get("model") or {}).get(which) or {}
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("AP") is not None]
    rates = sorted(r["img_s"] for r in train if isinstance(r.get("img_s"), (int, float)))
    best = max(evals, key=lambda r: r["AP"]) if evals else None
    times = [r["train_s"] for r in train if isinstance(r.get("train_s"), (int, float))]
    return {
        "run": str(run_dir), "model": which, "head": model.get("head"), "backbone": model.get("backbone"),
        "params_m": None if params is None else params / 1e6, "steps": max((r["step"] for r in rows), default=0),
        "img_s": rates[len(rates) // 2] if rates else None, "best": best, "evals": len(evals),
        "train_s": max(times) if times else None, "distill": distill,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
