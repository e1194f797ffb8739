"""Resumable, verified downloads into kdctl's cache, with the standard library only.

``download(url, dest, ...)`` writes ``dest.name + ".part"`` beside ``dest`` and asks the server
for the missing tail with an HTTP ``Range: bytes=N-`` header whenever a part file exists (a
previous run was interrupted, or the connection dropped during this one and it retries). A
``206 Partial Content`` answer whose ``Content-Range`` starts at N is appended; a ``200`` answer
(the server ignores ranges) restarts the file. The finished file's SHA-256 is checked (the full
hash, or the publisher's prefix) before it is moved onto ``dest`` with ``os.replace``, so ``dest``
only ever holds a complete, verified file. A file that fails the check is deleted.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from kdctl.version import __version__
from kdctl.errors import KdctlError

CHUNK = 1 << 20  # bytes per read
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def cache_home() -> Path:
    """kdctl's cache folder: ``$KDCTL_HOME``, else ``~/.cache/kdctl``."""
    env = os.environ.get("KDCTL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdctl"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hash(path: Path, actual: str, sha256: str | None, prefix: str | None) -> str:
    """Compare ``actual`` with the expected full hash or prefix (both lower-case hex); return
    which was checked ("sha256" / "prefix"). KdctlError naming ``path`` on a mismatch or when
    neither is known."""
    if sha256:
        if actual != sha256.lower():
            raise KdctlError(f"{path}: SHA-256 mismatch: expected {sha256.lower()}, got {actual}")
        return "sha256"
    if prefix:
        if not actual.startswith(prefix.lower()):
            raise KdctlError(f"{path}: SHA-256 mismatch: expected a hash starting {prefix.lower()}, got {actual}")
        return "prefix"
    raise KdctlError(f"{path}: no hash to check it against; pass --sha256 HEX")


def _offline(url: str, reason: object) -> KdctlError:
    host = urlsplit(url).hostname or url
    why = getattr(reason, "strerror", None) or str(reason)
    return KdctlError(f"{url}: cannot reach {host} ({why}); offline? download the file on a connected machine "
                      "and run `kdctl fetch --from-file FILE --as NAME`")


def _progress(description: str):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)


def download(url: str, dest: Path, *, sha256: str | None = None, sha256_prefix: str | None = None,
             retries: int = 3, timeout: float = 30.0, progress: bool = True) -> dict:
    """Fetch ``url`` into ``dest`` (resumable, verified, atomic); see the module docstring.

    Args:
        url: http(s) URL.
        dest: the final path; ``dest.name + ".part"`` beside it holds the partial download.
        sha256 / sha256_prefix: the expected full hash, or the first hex digits of it; one is
            required.
        retries: how many times a dropped connection is resumed within this call; after that
            the part file stays for the next call to resume.
        timeout: seconds to wait for the server on connect and on each read.

    Returns:
        ``{"path", "sha256" (full hex of the file), "checked" ("sha256"/"prefix"), "resumed_from"
        (bytes already there at the first request), "bytes"}``.

    Raises KdctlError (one line) when the server cannot be reached (offline), answers an HTTP
    error (404, ...), the download stays incomplete after ``retries``, or the hash differs (the
    file is then deleted).
    """
    if not (sha256 or sha256_prefix):
        raise KdctlError(f"{url}: no hash to check the download against; pass --sha256 HEX")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed_from = part.stat().st_size if part.exists() else 0
    attempt = 0
    with (_progress(dest.name) if progress else _null()) as bar:
        task = bar.add_task(dest.name, total=None) if bar is not None else None
        while True:
            done, total = _fetch_once(url, part, timeout, bar, task)
            if done:
                break
            attempt += 1
            if attempt > retries:
                have = part.stat().st_size if part.exists() else 0
                size = f" of {total / 1e6:.1f} MB" if total else ""
                raise KdctlError(f"{url}: download interrupted at {have / 1e6:.1f} MB{size}; "
                                 f"run the same command again to resume from {part}")
    actual = sha256_file(part)
    try:
        checked = check_hash(part, actual, sha256, sha256_prefix)
    except KdctlError as exc:
        part.unlink(missing_ok=True)
        raise KdctlError(f"{url}: {str(exc).split(': ', 1)[1]}; the file was deleted; check the URL and hash") from None
    with open(part, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(part, dest)
    return {"path": str(dest), "sha256": actual, "checked": checked, "resumed_from": resumed_from,
            "bytes": dest.stat().st_size}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _fetch_once(url: str, part: Path, timeout: float, bar, task) -> tuple[bool, int | None]:
    """One request: append the missing bytes to ``part``. Returns (complete, total size); a
    dropped connection returns (False, total) so the caller can resume."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"kdctl/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) URL checked by the caller
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the part is complete (the hash decides)
            return True, have
        raise KdctlError(f"{url}: the server answered HTTP {exc.code} {exc.reason}"
                         f"{'; the file is not there (moved or misspelt URL)' if exc.code == 404 else ''}; "
                         "download it elsewhere and run `kdctl fetch --from-file FILE --as NAME`") from None
    except urllib.error.URLError as exc:
        raise _offline(url, exc.reason) from None
    except (TimeoutError, socket.timeout, ConnectionError) as exc:
        raise _offline(url, exc) from None
    with response:
        status = response.status
        if status == 206:
            match = _RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                raise KdctlError(f"{url}: the server resumed at the wrong offset "
                                 f"(Content-Range {response.headers.get('Content-Range')!r}, have {have} bytes); "
                                 f"delete {part} and run again")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
        elif status == 200:  # no range support (or no part yet): start over
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            have, mode = 0, "wb"
        else:
            raise KdctlError(f"{url}: unexpected HTTP {status}; download it elsewhere and run "
                             "`kdctl fetch --from-file FILE --as NAME`")
        if bar is not None:
            bar.update(task, total=total, completed=have)
        with open(part, mode) as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout, OSError):
                    return False, total  # the part file keeps what arrived
                if not block:
                    break
                out.write(block)
                have += len(block)
                if bar is not None:
                    bar.update(task, completed=have)
    return (total is None or have >= total), total
