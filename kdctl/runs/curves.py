"""``kdctl compare RUN... --plot FILE.png``: the runs' learning curves side by side.

Beside :mod:`kdctl.runs.summary` (which reads run directories into table rows) because it reads the
same ``metrics.jsonl`` records, for the same command; not in :mod:`kdctl.analysis` (the target-
conflict analysis) nor :mod:`kdctl.predict` (inference). Two panels: COCO AP (in %) after each
evaluated epoch (``kind: eval`` records, ``epoch`` 0-based, drawn 1-based) and the total training
loss per optimizer step (``kind: train`` records, ``loss``, one per log interval). matplotlib's
object API on the Agg canvas: no display, no global backend switch.
"""
from __future__ import annotations

import io
from pathlib import Path

from kdctl.errors import KdctlError
from kdctl.runs.summary import read_metrics


def run_curves(run_dir: str | Path) -> dict:
    """``{"ap": [(epoch 1-based, AP %)], "loss": [(step, total loss)]}`` of one run; a record
    whose value is null (a skipped non-finite step) is left out."""
    rows = read_metrics(Path(run_dir))
    ap = [(int(r["epoch"]) + 1, 100.0 * float(r["AP"])) for r in rows
          if r.get("kind") == "eval" and isinstance(r.get("AP"), (int, float)) and isinstance(r.get("epoch"), int)]
    loss = [(int(r["step"]), float(r["loss"])) for r in rows
            if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float)) and isinstance(r.get("step"), int)]
    return {"ap": ap, "loss": loss}


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Legend labels: each folder's name, or its last two path parts where names repeat."""
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    return ["/".join(Path(r).parts[-2:]) for r in run_dirs]


def plot_runs(run_dirs: list[str | Path], path: str | Path) -> dict:
    """Write a PNG at ``path`` with AP per epoch and total loss per step of every run (one
    colour a run, the same in both panels). KdctlError when ``path`` is not a .png, its folder
    is missing, or no run has any record to draw. Returns the curves drawn, by run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from kdctl.artifact.checkpoint import atomic_write_bytes

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise KdctlError(f"--plot {path}: give a file name ending in .png")
    if not path.parent.is_dir():
        raise KdctlError(f"--plot {path}: folder {path.parent} does not exist; create it or choose another path")
    dirs = [Path(r) for r in run_dirs]
    curves = {str(r): run_curves(r) for r in dirs}
    if not any(c["ap"] or c["loss"] for c in curves.values()):
        raise KdctlError(f"--plot: no run has training or evaluation records in metrics.jsonl ({', '.join(map(str, dirs))})")
    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_ap, ax_loss = fig.subplots(1, 2)
    for i, (label, r) in enumerate(zip(run_labels(dirs), dirs)):
        colour = f"C{i % 10}"
        c = curves[str(r)]
        if c["ap"]:
            ax_ap.plot(*zip(*c["ap"]), marker="o", markersize=3, color=colour, label=label)
        if c["loss"]:
            ax_loss.plot(*zip(*c["loss"]), color=colour, linewidth=1.2, label=label, marker="o" if len(c["loss"]) == 1 else None)
    ax_ap.set(title="COCO AP per epoch (validation)", xlabel="epoch", ylabel="AP (%)")
    ax_ap.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set(title="total training loss per step", xlabel="step", ylabel="loss")
    for ax in (ax_ap, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return curves
