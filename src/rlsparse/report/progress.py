"""Progress display for long work: bytes or steps per second and ETA, on stderr."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, unit: str = "bytes",
                 enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a rich progress bar on stderr when ``enabled``.

    Example:
        >>> with progress_bar(total_bytes, "diff") as advance:
        ...     advance(chunk_bytes)
    """
    if not enabled:
        yield lambda n: None
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
