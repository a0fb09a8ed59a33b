"""Progress for long work, in one place: a bar on a terminal, plain lines elsewhere.

Modes (``--progress``): ``auto`` draws a bar when stderr is a terminal and otherwise prints a
plain line (done/total, rate, ETA) about every 10 s, so ``nohup``, CI logs and notebooks see
progress too; ``bar`` and ``lines`` force one of the two; ``none`` prints nothing. Library
functions take ``progress=`` as a mode or a bool (True = ``auto``, False = ``none``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, TextIO

PROGRESS_MODES = ("auto", "bar", "lines", "none")
LINE_INTERVAL_S = 10.0


def resolve_mode(progress: bool | str | None, stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``none`` for a ``--progress`` value (or a bool) on ``stream`` (stderr).

    Example:
        >>> resolve_mode("auto")  # "bar" on a terminal, "lines" under nohup or CI
    """
    from rlsparse.errors import UsageError

    if isinstance(progress, bool) or progress is None:
        mode = "auto" if progress else "none"
    else:
        mode = progress
    if mode not in PROGRESS_MODES:
        raise UsageError(f"--progress {mode}: expected one of {', '.join(PROGRESS_MODES)}")
    if mode == "auto":
        stream = sys.stderr if stream is None else stream
        return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
    return mode


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _amount(n: float, unit: str) -> str:
    if unit == "bytes":
        for div, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if n >= div:
                return f"{n / div:.2f} {name}"
        return f"{n:.0f} B"
    return f"{n:,.0f}"


def _rate(rate: float, unit: str, elapsed: float, done: int) -> str:
    """``3 steps/s``, or ``9.5 s/step`` when fewer than one unit a second goes by (slow training)."""
    if unit == "bytes" or rate >= 1 or done == 0:
        sep = "" if unit == "bytes" else f" {unit}"
        return f"{_amount(rate, unit)}{sep}/s"
    return f"{elapsed / done:.1f} s/{unit.rstrip('s') or unit}"


class Ticker:
    """Plain progress lines: ``what: done/total unit (pct), rate/s, ETA`` at most every ``interval`` s.

    Example:
        >>> t = Ticker(1000, "diff", unit="bytes")
        >>> t.update(500)  # prints when the interval has passed since the last line
    """

    def __init__(self, total: int, description: str, *, unit: str = "bytes", interval: float | None = None,
                 write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.description, self.unit = total, description, unit
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        unit = "" if self.unit == "bytes" else f" {self.unit}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = _duration((self.total - self.done) / rate) if rate > 0 and self.total else "?"
        return (f"{self.description}: {_amount(self.done, self.unit)}/{_amount(self.total, self.unit)}{unit}{pct}, "
                f"{_rate(rate, self.unit, elapsed, self.done)}, ETA {eta}")

    def set(self, done: int) -> None:
        """Record ``done`` (absolute) and print a line when the interval has passed."""
        self.done = done
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.write(self.line())

    def update(self, n: int) -> None:
        self.set(self.done + n)

    def finish(self) -> None:
        """A closing line, only when progress lines were printed (quick work stays silent)."""
        if self.last == self.start:
            return
        self.write(f"{self.description}: {_amount(self.done, self.unit)}"
                   f"{'' if self.unit == 'bytes' else ' ' + self.unit} in {_duration(self.clock() - self.start)}")


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, unit: str = "bytes",
                 enabled: bool | str = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows progress on stderr as ``enabled`` (a mode or a bool) says.

    Example:
        >>> with progress_bar(total_bytes, "diff", enabled="auto") as advance:
        ...     advance(chunk_bytes)
    """
    mode = resolve_mode(enabled)
    if mode == "none":
        yield lambda n: None
        return
    if mode == "lines":
        ticker = Ticker(total, description, unit=unit)
        yield ticker.update
        ticker.finish()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    console = Console(file=sys.stderr)
    if unit == "bytes":
        cols = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False),
                TransferSpeedColumn(), TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn()]
    else:
        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn()]
    with Progress(*cols, console=console, transient=False, refresh_per_second=4) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n: prog.advance(task, n)


def training_progress(progress: bool | str, description: str = "train", *, write: Callable[[str], None] | None = None,
                      interval: float | None = None):
    """A ``transformers.TrainerCallback`` showing training steps like ``progress_bar`` (None for ``none``).

    ``bar``: the same bar as every other command (steps, %, ETA); ``lines``: ``description: k/n
    steps (pct), steps/s, ETA`` about every ``interval`` seconds and a last line at the end. Set
    the trainer's ``disable_tqdm`` so that its own bar does not draw as well.

    Example:
        >>> callback = training_progress("auto", "sft")
        >>> trainer = SFTTrainer(..., callbacks=[callback])
    """
    mode = resolve_mode(progress)
    if mode == "none":
        return None
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self):
            self._bar = self._advance = self._ticker = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if mode == "bar":
                self._bar = progress_bar(state.max_steps, description, unit="steps", enabled="bar")
                self._advance = self._bar.__enter__()
                self._advance(state.global_step)
            else:
                self._ticker = Ticker(state.max_steps, description, unit="steps", interval=interval, write=write)
                self._ticker.done = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if self._advance is not None:
                self._advance(1)
            elif self._ticker is not None:
                self._ticker.set(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self._bar is not None:
                self._bar.__exit__(None, None, None)
            elif self._ticker is not None:
                self._ticker.finish()
            self._bar = self._advance = self._ticker = None

    return _Progress()
