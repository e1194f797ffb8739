"""Rich tables of an ``analyze-conflict`` report (:func:`kdctl.analysis.analyze.analyze_conflict`)."""
from __future__ import annotations

from rich import box
from rich.table import Table

from kdctl.analysis.conflict import SIZES

SPARK = " ▁▂▃▄▅▆▇█"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def sparkline(counts: list[int]) -> str:
    """One character per bin, height proportional to the count (the largest bin is full)."""
    peak = max(counts, default=0) or 1
    return "".join(SPARK[round(8 * c / peak)] if c else "·" for c in counts)


def tables(report: dict) -> list[Table]:
    """The summary table, the breakdown by level and size and, with a student checkpoint, the
    distances of the student's own and cross-head predictions to each teacher."""
    s, settings = report["student"], report["settings"]
    unit = "pairs" if settings["per_class"] else "locations"
    caption = (f"{report['data']['images']} images · target: {s['target']} · conflict: d > {settings['threshold']} · "
               f"n-t: non-trivial, target or teacher score > {settings['floor']} · ✓: assigns like the student · "
               "box IoU: the teacher's box with the assigned GT at the student's positives"
               + (" · units: (location, class) pairs" if settings["per_class"] else ""))
    main = Table(title=f"target conflict against the student's targets: {s['head']} ({s['assigner']} assigner)",
                 caption=caption, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD)
    for i, col in enumerate(("teacher", "head", "assigner", unit, "n-t", "conflict all", "conflict n-t",
                             "n-t histogram", "box IoU")):
        main.add_column(col, justify="left" if i < 3 or i == 7 else "right", no_wrap=i in (0, 7))
    for t in report["teachers"]:
        g, r = t["target"], t["regression"]
        main.add_row(t["label"], t["head"], f"{t['assigner']} {'✓' if t['assigns_like_student'] else '✗'}",
                     str(g["counted"]), str(g["nontrivial"]), _pct(g["conflict_ratio"]["all"]),
                     _pct(g["conflict_ratio"]["nontrivial"]), sparkline(g["histogram"]["nontrivial"]), _num(r["mean_iou"]))

    levels = list(report["levels"])
    by = Table(title="conflict ratio of the non-trivial units by FPN level and by COCO size of the assigned GT",
               title_justify="left", box=box.SIMPLE_HEAD)
    by.add_column("teacher", no_wrap=True)
    for col in (*levels, *SIZES):
        by.add_column(col, justify="right")
    for t in report["teachers"]:
        g = t["target"]
        by.add_row(t["label"], *(_pct(g["by_level"][lv]["conflict_ratio"]["nontrivial"]) for lv in levels),
                   *(_pct(g["by_size"][sz]["conflict_ratio"]["nontrivial"]) for sz in SIZES))
    out = [main, by]

    if any(t["student"] is not None for t in report["teachers"]):
        pred = Table(title="distance to each teacher's scores (non-trivial units): conflict ratio · mean d",
                     title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("teacher", "student target", "student's own predictions", "cross-head predictions"):
            pred.add_column(col, justify="left" if col == "teacher" else "right", no_wrap=True)
        for t in report["teachers"]:
            cells = []
            for kind in ("target", "student", "cross"):
                g = t[kind]
                cells.append("—" if g is None else
                             f"{_pct(g['conflict_ratio']['nontrivial'])} · {_num(g['mean_discrepancy']['nontrivial'])}")
            pred.add_row(t["label"], *cells)
        out.append(pred)
    return out
