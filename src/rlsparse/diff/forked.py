"""Run a stream kernel in forked worker processes on this machine: the same kernel, exact results.

Threads share one GIL: a kernel whose work holds it (the delta coder: the ANS coder and ~100
small numpy calls per chunk) gets about one core from any number of threads. Here the spans are
cut into byte-balanced shards of contiguous spans (``distributed.plan_shards``: tensor boundaries
preferred), and ``workers`` forked children take shards from a shared counter and run
``stream.run`` on each, inline (each child reads and computes its spans in order on one
thread, through the page cache: no read-ahead thread to hand chunks and the GIL to). Nothing
is pickled on the way in: fork hands the children the items and the kernel, open output files
included (a kernel may ``os.pwrite`` at its places in them). On the way
out, each child appends its pieces, pickled, to its own spool file (memory stays bounded however
big the pieces are) and reports each finished shard over a pipe; the parent hands the pieces to
``sink`` in span order and merges the partials in shard order, so the output is ``stream.run``'s.

A child that raises sends its exception and the parent re-raises it; a child that dies (killed,
out of memory) becomes a one-line ``WorkerError``. Either way the other children are stopped
before the error propagates, so the caller's clean-up (temporary outputs) runs after the last
write. POSIX only (``os.fork``): ``available()`` says whether this path can run.

Example:
    >>> out = run_forked(items, MyKernel(), workers=2, sink=sink, mapped=True)
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import tempfile
import time
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

from rlsparse.diff import stream
from rlsparse.diff.distributed import plan_shards
from rlsparse.errors import WorkerError

# Shards per process: a process that drew the slow (dense) tensors does not hold up the end of
# the run, while each shard's start-up (a ``stream.run``: ~1 ms) stays negligible.
SHARDS_PER_PROCESS = 4
_PROGRESS_BYTES = 64 << 20  # a worker reports progress in steps of this many bytes read


def available() -> bool:
    """Whether worker processes can be forked here (POSIX)."""
    return hasattr(os, "fork") and "fork" in multiprocessing.get_all_start_methods()


def run_forked(items: Sequence[stream.Item], kernel, *, workers: int = 2, spans: Sequence[stream.Span] | None = None,
               chunk_elements: int | None = None, sink: Callable[[stream.Span, Any], None] | None = None,
               advance: Callable[[int], None] = lambda n: None, mapped: bool = False,
               spool_dir: str | os.PathLike | None = None, label: str = "stream") -> stream.StreamOutput:
    """``stream.run`` in ``workers`` forked processes; same arguments and the same output.

    Args:
        items, kernel, spans, chunk_elements, sink, advance, mapped: As for ``stream.run``.
        workers: Worker processes (each computes on one thread).
        spool_dir: Folder for the children's piece spools (default: the system's temporary
            folder); they hold every piece once, so give room for the largest output.
        label: Names the work in errors ("pack", "apply").

    Raises:
        WorkerError: a worker process died (killed by a signal, out of memory).
        Any error a worker raised, re-raised in the parent.
    """
    t0 = time.perf_counter()
    if spans is None:
        spans = stream.split(items, stream.chunk_elements_for(items, chunk_elements))
    spans = list(spans)
    out = stream.StreamOutput()
    if not spans:
        return out
    ranges = plan_shards(items, spans, SHARDS_PER_PROCESS * max(1, workers))
    nproc = max(1, min(workers, len(ranges)))
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("i", 0)  # the next shard to take (with its own lock)
    spools = [tempfile.TemporaryFile(dir=spool_dir, prefix=".rlsparse-spool.") for _ in range(nproc)]
    procs: list = []
    conns: dict = {}
    try:
        for w in range(nproc):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, name=f"rlsparse-{label}-{w + 1}", daemon=True,
                            args=(items, kernel, spans, ranges, counter, spools[w].fileno(), send, mapped))
            p.start()
            send.close()
            procs.append(p)
            conns[recv] = w
        finished: dict[int, tuple[int, list, dict, int]] = {}  # shard -> (worker, records, partials, bytes)
        nxt = 0
        while nxt < len(ranges):
            while nxt in finished:  # hand over every shard that is next in order
                w, records, partials, nbytes = finished.pop(nxt)
                a = ranges[nxt][0]
                for k, offset, size in records:
                    piece = pickle.loads(os.pread(spools[w].fileno(), size, offset))
                    if sink is not None:
                        sink(spans[a + k], piece)
                out = stream.merge_outputs(kernel, [out, stream.StreamOutput(partials, nbytes)])
                nxt += 1
            if nxt == len(ranges):
                break
            if not conns:
                raise WorkerError(f"{label}: the worker processes ended before shard {nxt + 1} of {len(ranges)} "
                                  "was done; nothing was written: run again, or use threads (--parallel threads)")
            for conn in wait(list(conns)):
                w = conns[conn]
                try:
                    msg = conn.recv()
                except EOFError:
                    del conns[conn]
                    procs[w].join()
                    if procs[w].exitcode != 0:
                        raise _died(label, procs[w]) from None
                    continue
                if msg[0] == "progress":
                    advance(msg[1])
                elif msg[0] == "shard":
                    finished[msg[1]] = (w, msg[2], msg[3], msg[4])
                elif msg[0] == "error":
                    raise msg[1]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()
        for c in conns:
            c.close()
        for f in spools:
            f.close()
    out.seconds = time.perf_counter() - t0
    return out


def _died(label: str, proc) -> WorkerError:
    code = proc.exitcode
    how = f"was killed by signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exited with code {code}"
    hint = "; out of memory?" if code == -signal.SIGKILL else ""
    return WorkerError(f"{label}: worker process {proc.name} (pid {proc.pid}) {how}{hint}; nothing was written: "
                       "run again, or use threads (--parallel threads)")


def _child(items, kernel, spans, ranges, counter, spool_fd: int, conn, mapped: bool) -> None:
    """One worker process: take shards until none is left; pieces go to the spool, news to the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it stops us)
    unsent = 0

    def progress(nbytes: int, flush: bool = False) -> None:
        # batched: a message per span cost the parent ~0.1 ms of wake-up each
        nonlocal unsent
        unsent += nbytes
        if unsent and (flush or unsent >= _PROGRESS_BYTES):
            conn.send(("progress", unsent))
            unsent = 0

    try:
        pos = 0
        while True:
            with counter.get_lock():
                s = counter.value
                counter.value += 1
            if s >= len(ranges):
                break
            a, b = ranges[s]
            index = {(sp.item, sp.start): k for k, sp in enumerate(spans[a:b])}
            records: list[tuple[int, int, int]] = []

            def collect(span: stream.Span, piece) -> None:
                nonlocal pos
                data = pickle.dumps(piece, protocol=pickle.HIGHEST_PROTOCOL)
                view = memoryview(data)
                at = pos
                while view.nbytes:
                    n = os.pwrite(spool_fd, view, at)
                    view, at = view[n:], at + n
                records.append((index[span.item, span.start], pos, len(data)))
                pos += len(data)

            res = stream.run(items, kernel, spans=spans[a:b], workers=1, sink=collect, mapped=mapped,
                             advance=progress, inline=True)
            progress(0, flush=True)
            conn.send(("shard", s, records, res.partials, res.bytes_read))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which raises it
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # an exception that does not survive pickling: its type and text do
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        conn.send(("error", exc))
    finally:
        conn.close()
