"""Where `rlsparse delta pack` / `apply` spend their CPU: seconds per phase on one worker thread.

Wraps the phases' functions with ``time.thread_time`` counters (summed over threads), runs pack
or apply ``--repeat`` times and prints the run with the least total CPU. Works on any version of
the package importable as ``rlsparse`` (phases a version lacks are skipped), so a before/after
comparison is two runs with different ``PYTHONPATH``, alternated in the same minutes:

    PYTHONPATH=/tmp/before/src python bench/delta_phases.py pack BASE FT
    PYTHONPATH=src python bench/delta_phases.py pack BASE FT
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import threading
import time


def instrument() -> collections.Counter:
    import rlsparse.delta  # noqa: F401  (loads the submodules)
    from rlsparse.delta import codec
    from rlsparse.io import reader

    pk, ap = sys.modules["rlsparse.delta.pack"], sys.modules["rlsparse.delta.apply"]
    fm = sys.modules["rlsparse.delta.format"]
    spent: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def wrap(owner, name: str, label: str) -> None:
        f = getattr(owner, name, None)
        if f is None:
            return

        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                with lock:
                    spent[label] += time.thread_time() - t0

        setattr(owner, name, timed)

    wrap(codec, "encode_chunk", "encode (+ compare before)")
    wrap(codec, "decode_chunk", "decode")
    wrap(codec, "_encode_symbols", "of which ANS + header")
    wrap(codec, "_decode_symbols", "of which ANS + header")
    wrap(pk, "changes_and_digests", "compare + hash (blocked)")
    # 2-byte chunks (eighth round on): the blocked pass also codes the changes' symbols
    wrap(getattr(codec, "SparseScan", None), "add", "of which compare + symbols")
    wrap(pk, "chunk_digest", "hash (xxh3)")
    ap.chunk_digest = pk.chunk_digest
    wrap(reader.TensorReader, "read", "read (preadv copy)")
    wrap(getattr(reader, "MappedFiles", None), "view", "map views")
    wrap(ap._ShardedOutput, "write", "write output")
    wrap(ap._ShardedOutput, "write_at", "write output")
    wrap(ap._ShardedOutput, "finish", "close output (fsync)")
    wrap(fm.PatchWriter, "write", "patch spool")
    wrap(fm.PatchWriter, "close", "patch close")
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["pack", "apply"])
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    spent = instrument()
    import rlsparse.delta as delta

    tmp = tempfile.mkdtemp(prefix="delta-phases-")
    try:
        patch = os.path.join(tmp, "p.rlpatch")
        delta.pack(args.base, args.finetuned, patch, files=False, workers=args.workers)
        best = None
        for _ in range(max(1, args.repeat)):
            spent.clear()
            c0, t0 = time.process_time(), time.perf_counter()
            if args.what == "pack":
                delta.pack(args.base, args.finetuned, patch, files=False, workers=args.workers)
            else:
                delta.apply(args.base, patch, os.path.join(tmp, "out"), overwrite=True, workers=args.workers)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            if best is None or cpu < best[0]:
                best = (cpu, wall, dict(spent))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu, wall, phases = best
    print(f"{args.what}: CPU {cpu:.3f} s, wall {wall:.3f} s (best of {args.repeat} by CPU, {args.workers} worker(s), "
          f"load {os.getloadavg()[0]:.1f})")
    for label, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {label:26s} {seconds:.3f} s")


if __name__ == "__main__":
    main()
