"""Reading run directories: what a run trained, how far it got and how well it scored."""
from __future__ import annotations

from pathlib import Path

from kdctl.errors import KdctlError, load_yaml, os_problem, read_text


def read_metrics(run_dir: Path) -> list[dict]:
    """The well-formed records of ``run_dir/metrics.jsonl`` (see :func:`read_metrics_counted`)."""
    return read_metrics_counted(run_dir)[0]


def read_metrics_counted(run_dir: Path) -> tuple[list[dict], int]:
    """The records of ``run_dir/metrics.jsonl`` and the number of malformed lines skipped (cut
    short by a crash, or with fields that are not what a record holds:
    :func:`kdctl.engine.metrics.parse_record`), so that no figure comes from a damaged line."""
    from kdctl.engine.metrics import read_records

    path = Path(run_dir) / "metrics.jsonl"
    try:
        return read_records(path)
    except OSError as exc:
        raise KdctlError(f"{path}: cannot read the metrics log: {os_problem(exc)}") from None


def summarize_run(run_dir: str | Path) -> dict:
    """One row describing a run: model, parameters, steps, throughput and its best evaluation.

    Keys: ``run``, ``model`` (student/teacher), ``head``, ``backbone``, ``params_m`` (millions,
    from ``last.safetensors``), ``steps``, ``img_s`` (median of the logged training rates),
    ``best`` (the metrics of the evaluation with the highest AP, or None), ``evals`` (count),
    ``train_s`` (seconds in training steps, evaluation excluded), ``distill`` (the KD methods of a
    ``kdctl distill`` run, "none" for its plain baseline; None for ``kdctl train``),
    ``malformed_lines`` (lines of ``metrics.jsonl`` skipped as malformed).
    """
    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise KdctlError(f"{run_dir}: not a kdctl run directory (no recipe.yaml); give the --out folder of `kdctl train`")
    recipe = load_yaml(read_text(recipe_file, "run recipe"), recipe_file, "run recipe") or {}
    if not isinstance(recipe, dict):
        raise KdctlError(f"{recipe_file}: is not a recipe mapping (the run folder is damaged); give another run directory")
    which, params, distill = "student", None, None
    weights = run_dir / "last.safetensors"
    if weights.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
                which, distill = meta.get("model", "student"), meta.get("distill")
                params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys()
                             if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        except (SafetensorError, OSError, ValueError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise KdctlError(f"{weights}: is not a kdctl checkpoint (safetensors header unreadable: {reason}); "
                             "the run folder is damaged") from None
    model = (recipe.get("model") or {}).get(which) if isinstance(recipe.get("model"), dict) else None
    model = model if isinstance(model, dict) else {}
    rows, malformed = read_metrics_counted(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval" and _is_number(r.get("AP"))]
    rates = sorted(r["img_s"] for r in train if _is_number(r.get("img_s")))
    best = max(evals, key=lambda r: r["AP"]) if evals else None
    times = [r["train_s"] for r in train if _is_number(r.get("train_s"))]
    return {
        "run": str(run_dir), "model": which, "head": model.get("head"), "backbone": model.get("backbone"),
        "params_m": None if params is None else params / 1e6,
        "steps": max((r["step"] for r in rows if _is_number(r.get("step"))), default=0),
        "img_s": rates[len(rates) // 2] if rates else None, "best": best, "evals": len(evals),
        "train_s": max(times) if times else None, "distill": distill, "malformed_lines": malformed,
    }


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
