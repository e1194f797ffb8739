"""Run folders and temporary files: what kdctl never overwrites and never leaves behind.

**Atomic writes.** Every file kdctl writes goes through :func:`atomic_path`: a temporary file
``.NAME.<pid>-<host>-<random>.tmp`` beside the target, renamed onto it only when the write
succeeded; if the block raises (an error, Ctrl-C, or SIGTERM, which the CLI turns into an
exception), the temporary file is removed. Only ``kill -9`` (or a power cut) can leave one.

**Stale temporary files.** The first atomic write into a folder by a process removes the
temporary files that dead kdctl processes left there: names of this form whose process id
is not running on this host (and the ``.NAME.<8 hex>.tmp`` names, NAME a file kdctl writes,
of kdctl versions before the process id was part of the name). They are counted and reported
in one line on stderr. Temporary files of live processes and of other hosts (a shared file
system) are left alone.

**Run folders.** A run folder holds :data:`MARKER`, written before anything else, and the
files of :data:`RUN_FILES`. :func:`check_fresh_run_dir` refuses a fresh run into a folder
that holds the marker or any of those files (``--resume`` continues it, ``--overwrite``
deletes exactly those files first: :func:`clear_run_dir`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from kdctl.errors import KdctlError, load_yaml, os_problem, read_text

MARKER = ".kdctl-run"  # JSON: what made the folder a run (command, time, pid)
# what a run writes into its folder (besides MARKER and step_*.safetensors/.state.pt checkpoints)
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "tb", "last.safetensors", "last.state.pt", "best.safetensors", "best.state.pt")
_EXTRA_CHECKPOINT = re.compile(r"^step_\d+\.(safetensors|state\.pt)$")

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
# .NAME.<pid>-<host>-<random>.tmp (this version) and .NAME.<8 hex>.tmp (before it)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-f]{8}\.tmp$")
_LEGACY_TEMP = re.compile(r"^\..+\.(safetensors|pt|onnx|json|jsonl|yaml|png)\.[0-9a-f]{8}\.tmp$")

_cleaned: set[Path] = set()  # folders this process has already swept


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# where the stale-file count goes (one line on stderr); tests may replace it
report: Callable[[str], None] = _say


# ============================================================================= temporary files
def temp_path(path: str | Path) -> Path:
    """A fresh temporary name beside ``path``: ``.NAME.<pid>-<host>-<random>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}.tmp")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def is_stale_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file that a dead kdctl process left on this host."""
    m = _TEMP.match(name)
    if m is not None:
        return m["host"] == _HOST and not _alive(int(m["pid"]))
    return _LEGACY_TEMP.match(name) is not None


def remove_stale_temps(folder: str | Path) -> tuple[int, int]:
    """Remove the stale temporary files (:func:`is_stale_temp`) directly in ``folder``;
    returns (files removed, bytes freed). Files that vanish meanwhile or cannot be removed
    are skipped."""
    count = freed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0, 0
    for entry in entries:
        if not entry.name.endswith(".tmp") or not is_stale_temp(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
        except OSError:
            continue
        count += 1
        freed += size
    return count, freed


def sweep(folder: str | Path) -> int:
    """:func:`remove_stale_temps` once per folder and process, reported in one line; returns
    how many were removed now."""
    folder = Path(folder).absolute()
    if folder in _cleaned:
        return 0
    _cleaned.add(folder)
    count, freed = remove_stale_temps(folder)
    if count:
        report(f"note: removed {count} stale temporary file{'s' if count > 1 else ''} ({freed / 2**20:.1f} MiB) "
               f"that an interrupted kdctl left in {folder}")
    return count


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; when the block ends normally, fsync it
    (``durable``) and ``os.replace`` it onto ``path``. If the block raises anything (an error,
    KeyboardInterrupt, :class:`kdctl.errors.Terminated`), the temporary file is removed and
    ``path`` is left as it was. The caller writes the temporary path however it likes.

    An OSError (disk full, permission denied, a path through a file) becomes a KdctlError
    naming ``path`` with what the OS said."""
    path = Path(path)
    sweep(path.parent)
    tmp = temp_path(path)
    try:
        tmp.open("xb").close()  # reserve the name; created with the umask's permissions
    except OSError as exc:
        raise KdctlError(f"{path}: cannot write: {os_problem(exc)}") from None
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno is None or exc.filename not in (None, str(tmp), str(path)):
            raise  # not the OS refusing this write (an input, a library's own OSError): it says what
        raise KdctlError(f"{path}: cannot write: {os_problem(exc)}") from None
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        os_exc = _os_error_inside(exc)
        if os_exc is not None:  # a writer (safetensors) that reports the OS's error in its own type
            raise KdctlError(f"{path}: cannot write: {os_problem(os_exc)}") from None
        raise
    if durable:
        _fsync_dir(path.parent)


# errors of a write itself, whatever a library wrapped them in (a full disk must not read as a
# bad --opset): only these are looked for inside other exceptions
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _os_error_inside(exc: BaseException) -> OSError | None:
    """The write error (:data:`_WRITE_ERRNOS`) behind ``exc``: ``exc`` itself, its cause or
    context (a library that re-raised it as its own error), or one named in its message
    (``... (os error 28)`` from Rust I/O as safetensors raises it, ``[Errno 28] ...``)."""
    seen = 0
    while exc is not None and seen < 6:
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            return exc
        m = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(exc)) if isinstance(exc, Exception) else None
        if m and int(m[1] or m[2]) in _WRITE_ERRNOS:
            code = int(m[1] or m[2])
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


class _RecordingFile:
    """A binary file whose ``write`` remembers the OSError it raised: ``torch.save`` turns
    an OSError of its writer into a RuntimeError that no longer says what the OS said."""

    def __init__(self, handle):
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._handle.flush()


@contextlib.contextmanager
def recorded_writes(path: str | Path) -> Iterator[_RecordingFile]:
    """Open ``path`` for writing as a file object for libraries that hide the OS's errors
    (``torch.save(obj, handle)``); the OSError itself is raised when one occurred."""
    with open(path, "wb") as handle:
        rec = _RecordingFile(handle)
        try:
            yield rec
        except Exception:
            if rec.error is not None:
                raise rec.error from None
            raise


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def check_writable_target(path: str | Path, force: bool, option: str = "OUT") -> None:
    """Refuse, before any work, an output file that cannot be written where asked: an existing
    file without ``force``, a folder, a path through a file. KdctlError naming it."""
    path = Path(path)
    if path.is_dir():
        raise KdctlError(f"{path}: is a folder; give a file name for {option}")
    if path.exists() and not force:
        raise KdctlError(f"{path}: already exists; pass --force to overwrite it or choose another path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise KdctlError(f"{path}: {parent} is a file, not a folder; choose another path")
            break


# ============================================================================= run folders
def run_files(run_dir: Path) -> list[Path]:
    """What of a run is in ``run_dir``: the marker, :data:`RUN_FILES`, ``step_*`` checkpoints."""
    if not run_dir.is_dir():
        return []
    found = [run_dir / n for n in (MARKER, *RUN_FILES) if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    found += sorted(p for p in run_dir.iterdir() if _EXTRA_CHECKPOINT.match(p.name))
    return found


def check_fresh_run_dir(run_dir: Path) -> None:
    """Refuse a fresh run into a folder that is a file or already holds (part of) a run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise KdctlError(f"{run_dir}: is a file, not a folder; give another --out")
    found = run_files(run_dir)
    if found:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise KdctlError(f"{run_dir}: already holds a run ({names}); add --resume to continue it, give another --out, "
                         "or --overwrite to delete that run's files first")


def clear_run_dir(run_dir: Path) -> list[str]:
    """Delete the files of a previous run in ``run_dir`` (:func:`run_files`: the marker, the
    checkpoints, recipe, metrics and ``tb/``) and nothing else; returns their names."""
    removed = []
    for p in run_files(run_dir):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as exc:
            raise KdctlError(f"{p}: cannot delete for --overwrite: {os_problem(exc)}") from None
        removed.append(p.name)
    return removed


def _elastic_job() -> str | None:
    """torchrun's id of this job (the same in every restart of its worker group), or None."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def restarted_same_job(run_dir: Path) -> bool:
    """Whether this process is a torchrun restart (``--max-restarts``) of the job that marked
    ``run_dir``: its earlier attempt failed before writing ``last``, and starting afresh in its
    own folder is no accident."""
    job = _elastic_job()
    if not job or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        return False
    try:
        return json.loads((run_dir / MARKER).read_text(encoding="utf-8")).get("job") == job
    except (OSError, ValueError, AttributeError):
        return False


def claim_run_dir(run_dir: Path, *, overwrite: bool, command: str) -> list[str]:
    """Make ``run_dir`` this fresh run's: refuse a folder holding another run
    (:func:`check_fresh_run_dir`) unless ``overwrite`` (or a torchrun restart of the same job,
    :func:`restarted_same_job`) deletes that run's files first; then mark it. Returns the names
    deleted."""
    removed = []
    if run_files(run_dir) and (overwrite or restarted_same_job(run_dir)):
        removed = clear_run_dir(run_dir)
    else:
        check_fresh_run_dir(run_dir)
    mark_run_dir(run_dir, command)
    return removed


def mark_run_dir(run_dir: Path, command: str) -> None:
    """Create ``run_dir`` (and parents) and write :data:`MARKER` into it, before any other file."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise KdctlError(f"{run_dir}: a part of the path is a file, not a folder; give another --out") from None
    except OSError as exc:
        raise KdctlError(f"{run_dir}: cannot create the run folder: {os_problem(exc)}") from None
    info = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
            "job": _elastic_job()}
    atomic_write_bytes(run_dir / MARKER, (json.dumps(info) + "\n").encode())


def check_resumable(run_dir: Path, recipe) -> None:
    """Refuse ``--resume`` of a folder without ``last.safetensors``, with a damaged
    ``recipe.yaml``, or whose recipe differs from ``recipe`` (a :class:`kdctl.recipe.Recipe`)
    elsewhere than a larger ``train.epochs``."""
    from kdctl.recipe import validate_raw

    recipe_file = run_dir / "recipe.yaml"
    if not (run_dir / "last.safetensors").is_file():
        raise KdctlError(f"{run_dir}: nothing to resume (no last.safetensors); start without --resume")
    raw = load_yaml(read_text(recipe_file, "run recipe"), recipe_file, "run recipe")
    if not isinstance(raw, dict):
        raise KdctlError(f"{recipe_file}: is not a recipe mapping (the run folder is damaged); train into a new --out")
    saved = validate_raw(raw, str(recipe_file))
    want = recipe.model_copy(update={"train": recipe.train.model_copy(update={"epochs": saved.train.epochs})})
    if want != saved:
        diff = _first_difference(saved.model_dump(mode="json"), want.model_dump(mode="json"))
        raise KdctlError(f"{recipe_file}: the run was started with a different recipe ({diff}); "
                         "resume with the same recipe and overrides, or train into a new --out")
    if recipe.train.epochs < saved.train.epochs:
        raise KdctlError(f"{recipe_file}: train.epochs can only grow on resume (run has {saved.train.epochs})")


def _first_difference(a, b, prefix: str = "") -> str:
    """The first dotted key where two nested dicts differ, as ``key: a != b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} != {b!r}"
