"""Where the chunk codec spends its CPU: cProfile of ``codec.encode_chunk`` / ``decode_chunk``
over the chunks of a checkpoint pair, in one process (no I/O in the profile: chunks are read first).

Reads the tensors whose names contain one of ``--match`` (all by default) in 4M-element chunks
(the engine's span), then codes and decodes each chunk ``--repeat`` times under cProfile and
prints the total CPU per phase and the top functions by own time. Works on any version of the
package importable as ``rlsparse``, so a before/after comparison is two runs with different
``PYTHONPATH``:

    PYTHONPATH=/work/main/src python bench/delta_codec_profile.py BASE FT
    PYTHONPATH=src python bench/delta_codec_profile.py BASE FT
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np

from rlsparse.delta import codec
from rlsparse.io import dtypes
from rlsparse.io.checkpoint import Checkpoint
from rlsparse.io.reader import TensorReader

CHUNK = 4 << 20
SCAN_BLOCK = 128 * 1024  # pack's block (pack._BLOCK_ELEMENTS)


def chunks(base: str, finetuned: str, match: list[str], budget: int):
    a, b = Checkpoint.open(base), Checkpoint.open(finetuned)
    ra, rb = TensorReader(), TensorReader()
    got, held = [], 0
    for name in sorted(a.tensors):
        if match and not any(k in name for k in match):
            continue
        ia, ib = a.tensors[name], b.tensors.get(name)
        if ib is None or ib.shape != ia.shape or ib.dtype != ia.dtype:
            continue
        for s in range(0, ia.numel, CHUNK):
            n = min(CHUNK, ia.numel - s)
            old, new = ra.read(ia, s, n).copy(), rb.read(ib, s, n).copy()
            got.append((old, new, ia.dtype in dtypes.FLOAT_CODES))
            held += old.nbytes + new.nbytes
            if held >= budget:
                return got
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("--match", default="", help="comma-separated substrings of tensor names (default: all)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--budget-mb", type=int, default=600, help="stop reading chunks past this many MB")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--plain", action="store_true", help="no profiler: the least CPU of --repeat passes")
    ap.add_argument("--compiled", action="store_true",
                    help="code and decode sparse chunks with the compiled functions (the C kernels; numba before "
                         "the seventh round), as pack and apply do; without it numpy throughout")
    ap.add_argument("--decode-only", action="store_true", help="skip timing the encoder")
    ap.add_argument("--no-scan", action="store_true",
                    help="with --compiled: code 2-byte chunks from their changed positions (sparse_delta_symbols) "
                         "instead of finding and coding the changes block by block (codec.SparseScan, as pack does "
                         "from the eighth round on: the encode time then includes that compare)")
    args = ap.parse_args()
    fast = fast_encode = None
    if args.compiled:
        from rlsparse.delta import compiled

        if getattr(compiled, "KERNELS", None) is not None:  # the C kernels (seventh round on)
            fast = fast_encode = compiled.KERNELS
        else:  # numba (an older checkout's src): load or compile before any clock runs
            compiled.warm([np.uint8, np.uint16, np.uint32])
            fast = compiled.sparse_delta_apply
            fast_encode = getattr(compiled, "sparse_delta_symbols", None)  # older versions: numpy encodes
    scan_ok = (fast_encode is not None and not args.no_scan and hasattr(codec, "SparseScan")
               and hasattr(fast_encode, "scan_symbols16"))
    work = chunks(args.base, args.finetuned, [m for m in args.match.split(",") if m], args.budget_mb << 20)
    changes = [np.flatnonzero(old != new) for old, new, _ in work]  # pack finds them while hashing
    coded = [codec.encode_chunk(old, new, is_float, changed=idx) for (old, new, is_float), idx in zip(work, changes)]
    changed = sum(k for _, k, _ in coded)
    numel = sum(new.size for _, new, _ in work)
    print(f"{len(work)} chunks, {numel:,} elements, {changed:,} changed ({changed / max(numel, 1):.3%}), "
          f"{sum(len(d) for _, _, d in coded):,} coded bytes")
    for what in ("decode",) if args.decode_only else ("encode", "decode"):
        scratch = np.empty(CHUNK, dtype=work[0][0].dtype)
        prof = cProfile.Profile(time.process_time)  # CPU, not wall: the machine may be busy
        best = float("inf")
        for _ in range(args.repeat):
            c0 = time.process_time()
            if not args.plain:
                prof.enable()
            for (old, new, is_float), idx, (enc, _, data) in zip(work, changes, coded):
                if what == "encode":
                    if fast_encode is None:
                        codec.encode_chunk(old, new, is_float, changed=idx)
                    elif scan_ok and new.itemsize == 2:
                        scan = codec.SparseScan(fast_encode, new.size, is_float)
                        for a in range(0, new.size, SCAN_BLOCK):
                            scan.add(old[a:a + SCAN_BLOCK], new[a:a + SCAN_BLOCK], a)
                        codec.encode_chunk(old, new, is_float, compiled=fast_encode, scan=scan)
                    else:
                        codec.encode_chunk(old, new, is_float, changed=idx, compiled=fast_encode)
                else:  # apply decodes over its own copy of the base chunk
                    scratch[:old.size] = old
                    codec.decode_chunk(enc, data, scratch[:old.size], new.size, new.dtype, is_float, "bench",
                                       inplace=True, compiled=fast)
            prof.disable()
            best = min(best, time.process_time() - c0)
        print(f"\n{what}: {best:.3f} s CPU, least of {args.repeat} passes"
              f"{'' if args.plain else ' (under cProfile)'}; decode includes copying the base chunk")
        if not args.plain:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
            print("\n".join(line for line in s.getvalue().splitlines()[4:] if line.strip()))

if __name__ == "__main__":
    main()
