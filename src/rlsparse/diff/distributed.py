"""Run a stream kernel on a Ray cluster: the same kernel, the same stream code, exact results.

The plan is made once, on the driver. Its spans (``stream.split``: whole rows, FP8 blocks) are
cut into byte-balanced shards of contiguous spans, preferring cuts at tensor boundaries (a huge
tensor is split into row ranges). Each shard is one Ray task that runs ``stream.run`` over its
spans, reading the checkpoint files from the path the driver saw (a shared filesystem: tensors
never travel through the object store), and returns its per-item partials and its ordered
pieces (mask bytes). The driver takes the shards in order, merges partials with the kernel's
associative ``merge`` and hands pieces to the sink in order, so results and mask files are
bit-identical to a local run. A worker lost mid-task is retried by Ray (``max_retries``): a
shard is a pure function of its inputs, so the retry gives the same answer.
"""

from __future__ import annotations

import bisect
import copy
import socket
import time
from typing import Any, Callable, Sequence

from rlsparse.diff import stream
from rlsparse.errors import CheckpointError, RlsparseError, UsageError, require

# Shards per CPU of the cluster: enough that a slow node does not hold up the end of the run,
# few enough that per-task overhead (~ms) and per-shard results stay negligible.
SHARDS_PER_CPU = 4
MAX_RETRIES = 3


def ray_runner(address: str, **options) -> Callable[..., stream.StreamOutput]:
    """A drop-in for ``stream.run`` that runs on Ray at ``address`` ("local": this machine's
    cluster, started if none runs). Extra ``options`` go to ``run_on_ray``."""

    def execute(items, kernel, **kw):
        kw.pop("workers", None)
        return run_on_ray(items, kernel, address=address, **options, **kw)

    return execute


def plan_shards(items: Sequence[stream.Item], spans: Sequence[stream.Span], count: int) -> list[tuple[int, int]]:
    """Cut ``spans`` into at most ``count`` contiguous (begin, end) ranges of about equal bytes;
    a cut moves to the nearest tensor start within a quarter of a shard when there is one."""
    cum = [0]
    for s in spans:
        cum.append(cum[-1] + stream.span_bytes(items, s))
    count = max(1, min(count, len(spans)))
    target = cum[-1] / count
    starts = [i for i, s in enumerate(spans) if s.first]
    start_bytes = [cum[i] for i in starts]
    cuts = [0]
    for j in range(1, count):
        goal = j * target
        k = bisect.bisect_left(cum, goal)
        if k > 0 and goal - cum[k - 1] < cum[min(k, len(spans))] - goal:
            k -= 1
        m = bisect.bisect_left(start_bytes, goal)
        near = [starts[i] for i in (m - 1, m) if 0 <= i < len(starts) and abs(start_bytes[i] - goal) <= target / 4]
        if near:
            k = min(near, key=lambda i: abs(cum[i] - goal))
        if cuts[-1] < k < len(spans):
            cuts.append(k)
    cuts.append(len(spans))
    return list(zip(cuts, cuts[1:]))


def run_on_ray(items: Sequence[stream.Item], kernel, *, address: str = "local", chunk_elements: int | None = None,
               sink: Callable[[stream.Span, Any], None] | None = None, advance: Callable[[int], None] = lambda n: None,
               shards: int | None = None, max_retries: int = MAX_RETRIES) -> stream.StreamOutput:
    """``stream.run`` on a Ray cluster; same arguments and the same (bit-identical) output.

    Args:
        items, kernel, chunk_elements, sink, advance: As for ``stream.run``.
        address: Ray address ("local": connect to this machine's cluster or start one). If Ray
            is already initialised in this process, that connection is used as is.
        shards: Number of tasks (default: 4 per CPU of the cluster).
        max_retries: Retries of a task whose worker died (node lost, process killed).

    Raises:
        CheckpointError: a worker cannot read a checkpoint file (names the node and the path).
    """
    ray = require("ray", "distributed")
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UsageError(f"ray={address!r}: cannot connect to a Ray cluster ({str(exc).splitlines()[0]}); "
                             "give the head's address (host:6379 or ray://host:10001) or 'local'") from None
        started = True
    try:
        t0 = time.perf_counter()
        spans = stream.split(items, stream.chunk_elements_for(items, chunk_elements))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        ranges = plan_shards(items, spans, shards or SHARDS_PER_CPU * cpus)
        task = ray.remote(_run_shard).options(num_cpus=1, max_retries=max_retries, retry_exceptions=False)
        items_ref = ray.put(list(items))
        refs = [task.remote(items_ref, kernel, spans[a:b], sink is not None) for a, b in ranges]
        merged = stream.StreamOutput()
        for (a, b), ref in zip(ranges, refs):
            try:
                out, pieces = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, RlsparseError):
                    raise type(cause)(str(cause)) from None
                raise
            out.partials = copy.deepcopy(out.partials)  # ray.get hands out read-only arrays; merge may mutate
            merged = stream.merge_outputs(kernel, [merged, out])
            if sink is not None:
                for k, piece in pieces:
                    sink(spans[a + k], piece)
            advance(out.bytes_read)
        merged.seconds = time.perf_counter() - t0  # the driver's wall time, cluster start-up excluded
        return merged
    finally:
        if started:
            ray.shutdown()


def _run_shard(items: list[stream.Item], kernel, spans: list[stream.Span], want_pieces: bool):
    """One Ray task: check every file is readable here, then stream the shard's spans."""
    for path in sorted({str(items[s.item].infos[i].file) for s in spans for i in range(len(items[s.item].infos))}
                       | {str(sc.file) for s in spans for sc in items[s.item].scales if sc is not None}):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise CheckpointError(
                f"{path}: not readable on Ray node {socket.gethostname()} ({exc.strerror}); every worker must see "
                "the checkpoints at the driver's path (a shared filesystem)") from None
    pieces: list[tuple[int, Any]] = []
    index = {(s.item, s.start): k for k, s in enumerate(spans)}
    out = stream.run(items, kernel, spans=spans, workers=1,
                     sink=(lambda s, p: pieces.append((index[s.item, s.start], p))) if want_pieces else None)
    return out, pieces
