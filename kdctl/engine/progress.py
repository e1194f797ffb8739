"""The live training row: epoch, iteration, each named loss, lr, img/s, ETA, memory.

Drawn with rich on stderr when it is a terminal; otherwise (CI, pipes) one plain line per log
interval, so logs stay readable.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Context manager around a rich ``Progress`` with one task per epoch."""

    def __init__(self, epochs: int, steps_per_epoch: int, *, disable: bool = False, console: Console | None = None):
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.console = console or Console(stderr=True)
        self.disable = disable
        self.live = not disable and self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
            transient=False,
        )
        self.task = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, done: int) -> None:
        if self.task is not None:
            self.progress.stop_task(self.task)
        self.task = self.progress.add_task("train", total=self.steps_per_epoch, completed=done, epoch=epoch + 1,
                                           epochs=self.epochs, info="")

    def advance(self) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def update(self, step: int, epoch: int, losses: dict[str, float], lr: float, img_s: float, mem_mb: float) -> None:
        """Called every log interval with the averaged losses (one sync per interval)."""
        parts = [f"{k.removeprefix('loss_')} {v:.4f}" for k, v in losses.items()]
        total = sum(losses.values())
        info = f"loss {total:.4f} ({', '.join(parts)})  lr {lr:.2e}  {img_s:.1f} img/s  {mem_mb:.0f} MiB"
        if self.task is not None:
            self.progress.update(self.task, advance=1, info=info)
        if not self.live and not self.disable:
            inner = step - epoch * self.steps_per_epoch
            eta = self._eta(step)
            self.console.print(f"epoch {epoch + 1}/{self.epochs} iter {inner}/{self.steps_per_epoch}  {info}  eta {eta}",
                               highlight=False, soft_wrap=True)

    def _eta(self, step: int) -> str:
        if not hasattr(self, "_first_step"):
            self._first_step, self._t0 = step, time.perf_counter()
            return "?"
        rate = (time.perf_counter() - self._t0) / max(step - self._first_step, 1)
        left = max(self.epochs * self.steps_per_epoch - step, 0) * rate
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def pause(self) -> None:
        self.progress.stop()

    def resume(self) -> None:
        if self.live:
            self.progress.start()
