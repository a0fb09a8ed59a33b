"""Write-behind: positional writes done on a background thread while the caller computes on.

A chunk written with ``O_DIRECT`` (``StreamingSafetensorsWriter(direct=True)``) blocks its
writer until the disk has it; done inline, a worker alternates between computing and waiting.
``WriteBehind`` gives the caller page-aligned buffers from a small ring; the caller fills one,
hands it over with ``submit`` and goes on with the next, while one thread writes the ring in
order. A buffer comes back to the ring once written, so memory stays at ``depth`` buffers.

The first error of a write is raised by the next ``buffer``, ``submit`` or ``flush`` call (and
every later write is dropped), so a failure reaches the caller's own error handling; ``flush``
waits until every submitted write is done. The thread belongs to the process that made the
object: a forked child must make its own (``pid`` says whose it is).

Example:
    >>> wb = WriteBehind(depth=3)
    >>> buf = wb.buffer(nbytes, phase=offset % 4096)
    >>> buf[:] = data
    >>> wb.submit(writer.write_at, name, start, buf, buffer=buf)
    >>> wb.flush()
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable

import numpy as np

from rlsparse.io.memory import PAGE, aligned_empty, placed


class WriteBehind:
    """A ring of ``depth`` page-aligned buffers and one thread that runs the writes handed to it."""

    def __init__(self, depth: int = 3) -> None:
        self.depth = max(1, depth)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.depth):
            self._free.put(np.empty(0, dtype=np.uint8))
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rlsparse-write-behind", daemon=True)
        self._thread.start()
        self.pid = os.getpid()

    def buffer(self, nbytes: int, phase: int = 0) -> np.ndarray:
        """A free buffer of ``nbytes`` whose first byte lies ``phase`` bytes into a page (so the
        part of it that lands on whole pages of the output can go out with O_DIRECT uncopied).
        Waits while every buffer is still being written."""
        self._raise()
        view = placed(self._free.get(), nbytes, phase)
        if view is None:  # grown once to the largest chunk (at any phase), then reused
            view = aligned_empty(nbytes + PAGE)[phase:phase + nbytes]
        return view

    def submit(self, write: Callable[..., None], *args, buffer: np.ndarray) -> None:
        """Run ``write(*args)`` on the write thread; ``buffer`` (from ``buffer``) returns to the
        ring once it has run."""
        self._raise()
        with self._done:
            self._pending += 1
        self._jobs.put((write, args, buffer))

    def flush(self) -> None:
        """Wait until every submitted write has run; raise the first error among them."""
        with self._done:
            while self._pending:
                self._done.wait()
        self._raise()

    def close(self) -> None:
        """Flush, then stop the thread."""
        try:
            self.flush()
        finally:
            self._jobs.put(None)
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            write, args, buffer = job
            try:
                if self._error is None:
                    write(*args)
            except BaseException as exc:  # handed to the caller's next call
                self._error = exc
            finally:
                self._free.put(_root(buffer))
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()


def _root(view: np.ndarray) -> np.ndarray:
    """The allocation a buffer was cut from (numpy keeps the owner as every view's ``base``)."""
    return view if view.base is None else view.base
