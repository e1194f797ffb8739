"""Data loaders whose order **and** augmentation depend only on (seed, epoch, position).

That is what makes ``--resume`` exact: a run resumed at step s of epoch e sees the same
batches, flipped the same way, as the uninterrupted run. The sampler yields, per batch, a list
of ``(index, sample_seed)`` pairs; :class:`SeededDataset` draws the sample's random transforms
under a generator seeded with ``sample_seed`` (forked, so the process RNG is untouched), in the
main process or any worker alike.
"""
from __future__ import annotations

import functools
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdctl.data.collate import collate
from kdctl.errors import KdctlError


_MAX_REPLACEMENTS = 16  # unreadable images in a row before training gives up


class SeededDataset(Dataset):
    """Wraps a dataset so that ``ds[(i, seed)]`` is ``base[i]`` with the transforms' random
    draws made under ``torch.manual_seed(seed)`` (in a forked RNG state)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, None)
        sample = self._draw(idx, seed)
        if "image" in sample:
            return sample
        # an image that failed to decode with data.skip_bad: the next readable one takes its
        # place, so that every batch (and every rank's) keeps its size; the batch reports it
        unreadable = list(sample["unreadable"])
        for step in range(1, min(len(self.base), _MAX_REPLACEMENTS + 1)):
            # its own seed: the same one would draw the same mosaic partners again
            sample = self._draw((idx + step) % len(self.base), None if seed is None else seed + step)
            if "image" in sample:
                return {**sample, "unreadable": unreadable}
            unreadable += sample["unreadable"]
        raise KdctlError(f"{unreadable[0][0]}: this and the {len(unreadable) - 1} images after it in the dataset are "
                         "unreadable (data.skip_bad); fix or remove the damaged image files")

    def _draw(self, idx: int, seed: int | None):
        if seed is None:
            return self.base[idx]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[idx]


class EpochBatchSampler(Sampler[list]):
    """Batches of ``(index, sample_seed)`` for one epoch.

    The permutation comes from ``seed`` and ``epoch`` (no shuffle: 0..n-1); the first
    ``start_batch`` batches are skipped (resume). ``rank``/``world_size`` give each process
    every ``world_size``-th batch of the same order (distributed training): the role of
    ``DistributedSampler`` with per-epoch seeding, plus per-sample augmentation seeds and a
    start offset, which make resume exact. :meth:`set_epoch` moves one sampler (and a loader
    with persistent workers over it) to the next epoch.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate ``epoch`` from its batch ``start_batch`` next time."""
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        """Batches each process sees in a full epoch."""
        return num_batches(self.n, self.batch_size, self.world_size, self.drop_last)

    def _all(self) -> list[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        per_step = self.batch_size * self.world_size
        steps = self.batches_per_epoch()
        out = []
        for s in range(steps):
            chunk = order[s * per_step:(s + 1) * per_step]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if len(mine) == 0:  # the last global batch is short: reuse the first indices
                mine = order[: self.batch_size]
            out.append([(int(i), int(seeds[i])) for i in mine])
        return out

    def __iter__(self) -> Iterator[list]:
        yield from self._all()[self.start_batch:]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Steps per epoch for ``n`` samples and ``batch_size`` per process."""
    per_step = batch_size * world_size
    return max(1, n // per_step) if drop_last else max(1, -(-n // per_step))


def _worker_ignores_signals(_: int) -> None:
    """Data workers leave SIGINT/SIGTERM to the main process, which finishes its step and saves
    (Ctrl-C and SLURM's SIGTERM reach the whole process group, workers included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown_workers(loader: DataLoader) -> None:
    """Stop a loader's persistent workers now, through their queues. Needed because the
    workers ignore SIGTERM (see :func:`_worker_ignores_signals`): left to Python's exit
    handlers, which terminate and join daemonic children, they would hang the exit."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def make_loader(dataset: Dataset, batch_sampler: Sampler, *, num_workers: int, pad_divisor: int, pin_memory: bool = False,
                persistent: bool = False) -> DataLoader:
    """A DataLoader over :class:`SeededDataset` with kdctl's collate; ``persistent`` keeps the
    workers alive from epoch to epoch (move the sampler on with ``set_epoch``)."""
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate, pad_divisor=pad_divisor),
        pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0,
        worker_init_fn=_worker_ignores_signals if num_workers > 0 else None,
    )


def eval_loader(dataset: Dataset, *, batch_size: int, num_workers: int, pad_divisor: int) -> DataLoader:
    """In-order batches for inference."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=functools.partial(collate, pad_divisor=pad_divisor),
    )
