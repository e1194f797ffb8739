"""Figures of ``kdctl analyze-conflict`` with matplotlib's object API and the Agg canvas (no
pyplot, no global backend switch, no display needed).

- :func:`plot_report`: the discrepancy histograms of all teachers side by side and the
  conflict ratio per FPN level (and, with a student checkpoint, the student's own and the
  cross-head predictions' discrepancy to each teacher);
- :func:`write_visualizations`: per image, CrossKD's Fig. 2 in kind: the student's target map,
  each teacher's score map and their discrepancy over the photo.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from kdctl.analysis.conflict import BINS, level_names
from kdctl.artifact.checkpoint import atomic_write_bytes


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x - 0.4 + width * (i + 0.5), [np.nan if v is None else v for v in values], width, label=name)
    ax.set_xticks(x, groups)


def plot_report(report: dict, path: str | Path) -> None:
    """Write the summary figure of :func:`kdctl.analysis.analyze.analyze_conflict`'s report as PNG."""
    teachers = report["teachers"]
    with_student = any(t["student"] is not None for t in teachers)
    panels = 3 if with_student else 2
    fig = _figure(5.2 * panels, 4.2)
    axes = fig.subplots(1, panels)
    edges = [f"{i / BINS:.1f}" for i in range(BINS)]
    name = lambda t: f"{t['label']} ({t['head']}, {t['assigner']})"  # noqa: E731

    hist = {}
    for t in teachers:
        h = np.asarray(t["target"]["histogram"]["nontrivial"], dtype=float)
        hist[name(t)] = list(h / max(h.sum(), 1))
    _grouped_bars(axes[0], edges, hist)
    thr = report["settings"]["threshold"]
    axes[0].axvline(thr * BINS - 0.5, color="black", lw=0.8, ls="--")
    axes[0].set(title="discrepancy to the student's targets\n(non-trivial locations)", xlabel="discrepancy bin (lower edge)",
                ylabel="share of locations (log)", yscale="log")
    axes[0].legend(fontsize=7)

    levels = level_names(len(report["levels"]))
    ratios = {name(t): [t["target"]["by_level"][lv]["conflict_ratio"]["nontrivial"] for lv in levels] for t in teachers}
    _grouped_bars(axes[1], levels, ratios)
    top = max((v for vs in ratios.values() for v in vs if v is not None), default=0.0)
    axes[1].set(title=f"conflict ratio (d > {thr}) per level\n(non-trivial locations)", ylabel="conflict ratio",
                ylim=(0, max(1.25 * top, 0.01)))
    axes[1].legend(fontsize=7, loc="upper right")

    if with_student:
        series = {}
        for t in teachers:
            for kind in ("target", "student", "cross"):
                if t[kind] is None:
                    continue
                h = np.asarray(t[kind]["histogram"]["nontrivial"], dtype=float)
                what = {"target": "student target", "student": "student's own", "cross": "cross-head"}[kind]
                series[f"{what} vs {t['label']}"] = list(h / max(h.sum(), 1))
        _grouped_bars(axes[2], edges, series)
        axes[2].set(title="distance to the teacher's scores\n(non-trivial locations)", xlabel="discrepancy bin (lower edge)",
                    ylabel="share of locations (log)", yscale="log")
        axes[2].legend(fontsize=7)
    fig.suptitle(f"student {report['student']['head']} ({report['student']['assigner']} assigner) · "
                 f"{report['data']['source']} {report['data']['split']} · {report['data']['images']} images", fontsize=10)
    fig.tight_layout()
    _save(fig, Path(path))


def location_map(values: torch.Tensor, sizes: list[tuple[int, int]], strides: list[int], point_offset: float,
                 height: int, width: int) -> np.ndarray:
    """Paint per-location values ``[L]`` (levels concatenated, row-major) onto an image of
    ``height x width`` pixels: each pixel takes, per level, the cell whose prior centre
    (``(x + offset) * stride``) is nearest, and the max over levels. Returns float ``[H, W]``."""
    ys = torch.arange(height, dtype=torch.float32)
    xs = torch.arange(width, dtype=torch.float32)
    out = torch.zeros(height, width)
    start = 0
    for (h, w), s in zip(sizes, strides):
        level = values[start:start + h * w].float().view(h, w)
        iy = torch.floor(ys / s - point_offset + 0.5).clamp(0, h - 1).long()  # nearest centre, ties up
        ix = torch.floor(xs / s - point_offset + 0.5).clamp(0, w - 1).long()
        out = torch.maximum(out, level[iy][:, ix])
        start += h * w
    return out.numpy()


def write_visualizations(samples: list[dict], out_dir: str | Path, report: dict) -> list[Path]:
    """One PNG per sample in ``out_dir``: a row per teacher with the student's target map, the
    teacher's score map (both max over classes) and the discrepancy, over the photo with its GT
    boxes. Returns the paths written."""
    from matplotlib.patches import Rectangle

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    head = report["student"]
    for n, sample in enumerate(samples):
        rows = list(sample["maps"].items())
        fig = _figure(10.5, 3.4 * len(rows))
        axes = np.atleast_2d(fig.subplots(len(rows), 3))
        img = sample["image"]
        h, w = img.shape[:2]
        for r, (label, maps) in enumerate(rows):
            titles = (f"student target ({head['head']}, {head['assigner']})", f"teacher {label}",
                      "|target − teacher| (max over classes)")
            for c, key in enumerate(("target", "teacher", "discrepancy")):
                ax = axes[r, c]
                values = torch.where(maps["valid"], maps[key], torch.zeros_like(maps[key]))
                heat = location_map(values, sample["sizes"], sample["strides"], sample["point_offset"], h, w)
                ax.imshow(img)
                # opacity grows with the value, so the photo shows where the map is near 0
                ax.imshow(heat, cmap="magma" if key == "discrepancy" else "viridis", vmin=0, vmax=1,
                          alpha=np.clip(0.1 + 0.8 * heat, 0, 0.9))
                for x1, y1, x2, y2 in sample["boxes"]:
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", lw=1))
                ax.set_title(titles[c], fontsize=8)
                ax.axis("off")
        fig.suptitle(f"image {sample['image_id']} · maps: max over FPN levels P3-P7", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"conflict_{n:03d}_{sample['image_id']}.png"
        _save(fig, path)
        written.append(path)
    return written
