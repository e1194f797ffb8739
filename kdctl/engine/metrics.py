"""The metrics log of a run: ``metrics.jsonl`` always, TensorBoard scalars when installed.

Each record is one JSON object on its own line of ``run_dir/metrics.jsonl``::

    {"step": 500, "epoch": 0, "kind": "train", "loss": 1.23, "loss_cls": 0.61, "lr": 0.01}
    {"step": 1000, "epoch": 1, "kind": "eval", "bbox_mAP": 0.312}

``step`` counts optimizer steps taken, ``epoch`` is 0-based, ``kind`` is ``train`` or ``eval``;
the rest are numbers. Non-finite numbers (a NaN loss) are written as ``null`` so the file stays
strict JSON that ``jq`` and ``pandas.read_json(lines=True)`` read. Every record is flushed at once
so ``tail -f`` follows a run and a crash loses at most the line being written.

TensorBoard: when ``torch.utils.tensorboard`` imports (the optional ``tensorboard`` package is
installed) the same numbers go to ``run_dir/tb/`` as ``{kind}/{name}`` scalars; when it is not
installed they are silently skipped: the JSONL file is the record, TensorBoard a convenience.

Only one process of a distributed run (rank 0) should open a MetricsLog.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from kdctl.artifact.checkpoint import atomic_path

KINDS = ("train", "eval")
RESERVED = ("step", "epoch", "kind")


def parse_record(line: str) -> dict | None:
    """One line of ``metrics.jsonl`` as its record, or None when the line is malformed: not a
    JSON object; ``step`` / ``epoch`` not non-negative integers; ``kind`` not a string; in a
    ``train`` / ``eval`` record, a value that is not a number or null (or an ``AP*`` / ``AR*``
    outside [-1, 1], COCO's range). Other kinds (the plan) hold any JSON values."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        return None
    if not all(_count(record.get(k)) for k in ("step", "epoch")):
        return None
    if record["kind"] in KINDS:
        for name, value in record.items():
            if name in RESERVED or value is None:
                continue
            if not _real(value) or (name[:2] in ("AP", "AR") and not -1 <= value <= 1):
                return None
    return record


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of the metrics log ``path`` and the number of malformed lines skipped
    (:func:`parse_record`; blank lines are not counted). A missing file has none. Damaged bytes
    spoil their own line only."""
    if not Path(path).is_file():
        return [], 0
    records, malformed = [], 0
    for line in Path(path).read_bytes().decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        record = parse_record(line)
        if record is None:
            malformed += 1
        else:
            records.append(record)
    return records, malformed


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _summary_writer_class() -> Any | None:
    """TensorBoard's SummaryWriter class, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def _number(name: str, value: Any) -> float | int | None:
    """A JSON-safe number from an int, float or one-element tensor/array; None if not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if not hasattr(value, "item"):
            raise TypeError(f"metric {name!r} is a {type(value).__name__}, not a number")
        value = value.item()  # host sync: log only at log intervals
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only metrics of one run (see the module docstring for the format).

    Args:
        run_dir: the run directory (must exist); the log is ``run_dir/metrics.jsonl``.
        tensorboard: also write ``run_dir/tb/`` when TensorBoard is installed.

    On resume, call :meth:`truncate_after` with the resumed step before writing, so that the
    steps run again are not recorded twice.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._writer_class = _summary_writer_class() if tensorboard else None
        self._writer: Any | None = None
        self._purge_step: int | None = None
        self._file: IO[str] | None = None
        self._open()

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard scalars are being written."""
        return self._writer_class is not None

    def _open(self) -> None:
        # A crash can leave a last line without its newline: end it so the next record starts
        # on a line of its own (the broken line is dropped by truncate_after on resume).
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as handle:
                handle.seek(-1, 2)
                ends_cleanly = handle.read(1) == b"\n"
            if not ends_cleanly:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write("\n")
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, kind: Literal["train", "eval"], step: int, epoch: int, values: Mapping[str, Any]) -> None:
        """Append one record: ``values`` maps metric names to numbers (Python numbers or
        one-element tensors; ``.item()`` is called, so call this at log intervals only)."""
        if self._file is None:
            raise ValueError(f"{self.path}: the metrics log is closed")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        clash = [k for k in values if k in RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record's own fields")
        record: dict[str, Any] = {"step": int(step), "epoch": int(epoch), "kind": kind}
        record.update({name: _number(name, value) for name, value in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer_class is not None:
            writer = self._tb_writer()
            for name, value in record.items():
                if name not in RESERVED and value is not None:
                    writer.add_scalar(f"{kind}/{name}", value, int(step))
            writer.flush()

    def record(self, kind: str, step: int, payload: Mapping[str, Any]) -> None:
        """Append one non-scalar record (``{"step", "epoch": 0, "kind", **payload}``, any
        JSON-ready values), e.g. the run's plan; not sent to TensorBoard. Readers select the
        records they want by ``kind``."""
        if self._file is None:
            raise ValueError(f"{self.path}: the metrics log is closed")
        if kind in KINDS:
            raise ValueError(f"{kind!r} records hold scalars: use log()")
        record = {"step": int(step), "epoch": 0, "kind": kind, **payload}
        self._file.write(json.dumps(record, allow_nan=False, default=str) + "\n")
        self._file.flush()

    def _tb_writer(self) -> Any:
        """The SummaryWriter, created on first use so that a preceding truncate_after can set
        its ``purge_step`` (TensorBoard hides events at or after it from the earlier run)."""
        if self._writer is None:
            assert self._writer_class is not None
            self._writer = self._writer_class(log_dir=str(self.run_dir / "tb"), purge_step=self._purge_step)
            self._purge_step = None
        return self._writer

    def truncate_after(self, step: int) -> tuple[int, int]:
        """Drop the records with ``step`` greater than ``step`` and every malformed line (one cut
        short by a crash; :func:`parse_record`), rewriting the file atomically. TensorBoard
        events after ``step`` are purged when its writer next opens. Returns (records dropped
        after ``step``, malformed lines dropped)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1
        after = malformed = 0
        if self.path.is_file():
            records, malformed = read_records(self.path)
            kept = [r for r in records if r["step"] <= step]
            after = len(records) - len(kept)
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept), encoding="utf-8")
        self._open()
        return after, malformed

    def close(self) -> None:
        """Flush and close the file and the TensorBoard writer; further closes do nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
