"""Unlabelled images for inference (``kdctl predict``): files, folders, glob patterns, video
frames, or the images of a labelled dataset, each letterboxed to one fixed input size.

:func:`collect_sources` turns the command line's SOURCE arguments into :class:`SourceItem`
rows (one per image file or video, with a unique output name), failing with one line for a
path that does not exist, a folder without images or a video without PyAV.
:func:`dataset_items` does the same for ``--data DATA --split S`` (its images, never its labels).
:class:`ImageStream` decodes them in order and yields one sample per image or video frame::

    image       uint8 [3, H, W]   letterboxed (keep ratio, bottom/right padding with ``fill``)
    valid_size  (h', w')          the resized image inside the padding, pixels
    orig_size   (h, w)            the image as decoded, pixels
    original    uint8 [3, h, w]   the image as decoded (for drawing and for --save-labels)
    name        str               unique output name (posix path, relative)
    source      str               the file (or dataset) it came from
    frame       int | None        frame index of a video, None for an image

:func:`kdctl.data.collate.collate_uint8` stacks samples into a batch; the scale that maps
detections back to original pixels is ``valid_size / orig_size`` per axis, as in evaluation.

An unreadable image is skipped and listed in :attr:`ImageStream.skipped` (``strict``: raise
instead). Video frames are read with PyAV (``pip install 'kdctl[video]'``).
"""
from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kdctl.data.dataset import decode_image
from kdctl.data.transforms import letterbox
from kdctl.data.yolo import IMAGE_SUFFIXES
from kdctl.errors import DataError, KdctlError

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
GLOB_CHARS = frozenset("*?[")
_SUFFIX_LIST = ", ".join(sorted(IMAGE_SUFFIXES))


@dataclass(frozen=True)
class SourceItem:
    """One image file, one video, or one record of a dataset.

    name: unique output name (posix, relative; a video's frames are named after it);
    path: the file (None for a dataset record); video: read frame by frame;
    record: index into the dataset's records (``--data``)."""

    name: str
    path: Path | None = None
    video: bool = False
    record: int | None = None


def _is_glob(text: str) -> bool:
    return any(c in GLOB_CHARS for c in text)


def _media(path: Path) -> bool:
    suffix = path.suffix.lower()
    return path.is_file() and (suffix in IMAGE_SUFFIXES or suffix in VIDEO_SUFFIXES)


def require_pyav(path: Path | str):
    """The ``av`` module, or KdctlError naming ``path`` and the install command."""
    try:
        import av
    except ImportError:
        raise KdctlError(f"{path}: reading video needs PyAV, which is not installed; "
                         "run pip install 'kdctl[video]' (or pip install av), or give image files") from None
    return av


def collect_sources(sources: Sequence[str | Path]) -> list[SourceItem]:
    """:class:`SourceItem` rows for SOURCE arguments, in order: an image or video file; a folder
    (searched recursively, files sorted; names relative to the folder); a glob pattern (``**``
    recursive; names are file names). A file reached twice is read once; a name taken twice gets
    ``_2``, ``_3`` ... before its suffix. KdctlError (one line) for a missing path, a file that is
    neither image nor video, a folder or pattern without images, a video without PyAV."""
    if not sources:
        raise KdctlError("no SOURCE given: name image files, folders, glob patterns or videos, or use --data DATA")
    found: list[tuple[str, Path]] = []
    for src in sources:
        text = str(src)
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if _media(f))
            if not files:
                raise KdctlError(f"{text}: no images ({_SUFFIX_LIST}) or videos in this folder or below; "
                                 "give a folder of images, image files or a glob pattern")
            found += [(f.relative_to(path).as_posix(), f) for f in files]
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix not in IMAGE_SUFFIXES and suffix not in VIDEO_SUFFIXES:
                raise KdctlError(f"{text}: not an image ({_SUFFIX_LIST}) nor a video "
                                 f"({', '.join(sorted(VIDEO_SUFFIXES))}); give image or video files")
            found.append((path.name, path))
        elif _is_glob(text):
            files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if _media(Path(f)))
            if not files:
                raise KdctlError(f"{text}: the pattern matches no images ({_SUFFIX_LIST}) or videos; check the pattern "
                                 "(quote it so that the shell does not expand it)")
            found += [(f.name, f) for f in files]
        else:
            raise KdctlError(f"{text}: no such file or folder; give image files, folders, glob patterns or videos")
    items: list[SourceItem] = []
    seen_files: set[Path] = set()
    taken: set[str] = set()
    for name, file in found:
        key = file.resolve()
        if key in seen_files:
            continue
        seen_files.add(key)
        video = file.suffix.lower() in VIDEO_SUFFIXES
        if video:
            require_pyav(file)
        items.append(SourceItem(_unique(name, taken), file, video=video))
    return items


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``stem_2.ext``, ``stem_3.ext`` ... when it is taken; adds the result to ``taken``."""
    out, k = name, 1
    while out.casefold() in taken:
        k += 1
        p = Path(name)
        out = p.with_name(f"{p.stem}_{k}{p.suffix}").as_posix()
    taken.add(out.casefold())
    return out


def dataset_items(dataset) -> list[SourceItem]:
    """One :class:`SourceItem` per record of a :class:`~kdctl.data.DetectionDataset` (its
    images; its labels are never read here), named by the records' ``file_name``."""
    if len(dataset) == 0:
        raise KdctlError(f"{dataset.source or 'the dataset'}: the split has no images; choose another --split or DATA")
    taken: set[str] = set()
    return [SourceItem(_unique(rec.file_name, taken), rec.path, record=i) for i, rec in enumerate(dataset.records)]


class ImageStream(torch.utils.data.IterableDataset):
    """Decode ``items`` in order and yield letterboxed samples (see the module docstring).

    Args:
        items: from :func:`collect_sources` or :func:`dataset_items`.
        size: ``(H, W)`` every image is letterboxed into, pixels.
        fill: the padding colour, one uint8 value per channel (``pad_colour(mean)``).
        dataset: the dataset that ``item.record`` indexes (``--data``).
        strict: raise DataError on an unreadable image or video instead of skipping it.
        limit: stop after this many samples (images or frames).

    Reads in the process that iterates it (use it with ``num_workers=0``), so that
    :attr:`skipped`, the ``(name, reason)`` pairs of unreadable files, is filled where it is read.
    """

    def __init__(self, items: Sequence[SourceItem], size: tuple[int, int], fill: Sequence[int], *,
                 dataset=None, strict: bool = False, limit: int | None = None):
        super().__init__()
        self.items = list(items)
        self.size = (int(size[0]), int(size[1]))
        self.fill = tuple(int(v) for v in fill)
        self.dataset = dataset
        self.strict = strict
        self.limit = limit
        self.skipped: list[tuple[str, str]] = []

    def expected(self) -> int | None:
        """How many samples the stream will yield at most, or None when a video's frame count is unknown."""
        total = 0
        for item in self.items:
            if item.video:
                frames = _frame_count(item.path)
                if frames is None:
                    return self.limit
                total += frames
            else:
                total += 1
        return total if self.limit is None else min(total, self.limit)

    def __iter__(self) -> Iterator[dict]:
        count = 0
        for item in self.items:
            for frame, image in (self._frames(item) if item.video else self._image(item)):
                if self.limit is not None and count >= self.limit:
                    return
                count += 1
                yield self._sample(item, frame, image)

    def _sample(self, item: SourceItem, frame: int | None, image: torch.Tensor) -> dict:
        boxed, valid = letterbox(image, self.size, self.fill)
        name = item.name if frame is None else f"{Path(item.name).with_suffix('').as_posix()}_{frame:06d}.jpg"
        source = str(item.path) if item.path is not None else f"{self.dataset.source}#{item.name}"
        return {"image": boxed, "valid_size": valid, "orig_size": (int(image.shape[-2]), int(image.shape[-1])),
                "original": image, "name": name, "source": source, "frame": frame}

    def _skip(self, name: str, exc: DataError) -> None:
        if self.strict:
            raise DataError(exc.path, f"{exc.problem.split(';')[0]}; remove the file or run without --strict to skip it") from None
        self.skipped.append((name, exc.problem.split(";")[0]))

    def _image(self, item: SourceItem) -> Iterator[tuple[None, torch.Tensor]]:
        try:
            if item.record is not None:
                image = self.dataset.load_image(self.dataset.records[item.record])
            else:
                image = decode_image(item.path)
        except DataError as exc:
            self._skip(item.name, exc)
            return
        yield None, image

    def _frames(self, item: SourceItem) -> Iterator[tuple[int, torch.Tensor]]:
        av = require_pyav(item.path)
        av_error = _av_error(av)
        try:
            container = av.open(str(item.path))
        except (av_error, OSError) as exc:
            self._skip(item.name, DataError(item.path, f"cannot open video ({exc.__class__.__name__})"))
            return
        with container:
            if not container.streams.video:
                self._skip(item.name, DataError(item.path, "no video stream in the file"))
                return
            try:
                for i, frame in enumerate(container.decode(container.streams.video[0])):
                    yield i, torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()
            except av_error as exc:
                self._skip(item.name, DataError(item.path, f"video decoding stopped ({exc.__class__.__name__})"))


def _frame_count(path: Path) -> int | None:
    """The frame count a video's header gives, or None (unknown, or unreadable)."""
    av = require_pyav(path)
    try:
        with av.open(str(path)) as container:
            frames = int(container.streams.video[0].frames) if container.streams.video else 0
    except (_av_error(av), OSError):
        return None
    return frames or None


def _av_error(av) -> type[Exception]:
    """PyAV's base error class (``FFmpegError`` since PyAV 14, ``AVError`` before)."""
    return getattr(av, "FFmpegError", None) or getattr(av, "AVError", Exception)
