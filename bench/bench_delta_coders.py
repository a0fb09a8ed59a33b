"""Entropy coder choice for patches: our chunk codes (schema version 1: ANS; version 2: zstd level
1 over our symbols) vs zstd -19 on the same streams, with each coder's CPU time.

For every chunk of the chosen tensors: our coded chunk (``codec.encode_chunk``) against zstd -19
of the gaps between changed indices and of the zigzagged ULP differences, raw (uint32 gaps,
dtype-width differences) and split into byte planes; and the order-0 bound of the same elements.

    python bench/bench_delta_coders.py BASE FINETUNED [--match layers.3.,embed]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zstandard

from rlsparse.delta import codec
from rlsparse.io.checkpoint import Checkpoint
from rlsparse.io.reader import TensorReader

CHUNK = 4 << 20


def planes(x: np.ndarray) -> bytes:
    b = x.view(np.uint8).reshape(-1, x.dtype.itemsize)
    return b"".join(np.ascontiguousarray(b[:, i]).tobytes() for i in range(x.dtype.itemsize))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("--match", default="layers.3.,embed", help="comma-separated substrings of tensor names")
    args = ap.parse_args()
    a, b = Checkpoint.open(args.base), Checkpoint.open(args.finetuned)
    ra, rb = TensorReader(), TensorReader()
    z = zstandard.ZstdCompressor(level=19)
    tot = dict(ans=0, v2=0, zstd19_planes=0, zstd19_raw=0, changed=0, numel=0)
    cpu = dict(ans=0.0, v2=0.0)
    hist: dict[int, int] = {}
    keys = args.match.split(",")
    for name in sorted(n for n in a.tensors if any(k in n for k in keys)):
        ia, ib = a.tensors[name], b.tensors[name]
        for s in range(0, ia.numel, CHUNK):
            n = min(CHUNK, ia.numel - s)
            old, new = ra.read(ia, s, n).copy(), rb.read(ib, s, n).copy()
            for key, version in (("ans", 1), ("v2", 2)):
                t = time.process_time()
                enc, _, data = codec.encode_chunk(old, new, True, version=version)
                codec.decode_chunk(enc, data, old, n, old.dtype, True, "bench", version=version)
                cpu[key] += time.process_time() - t
                tot[key] += len(data)
            idx = np.flatnonzero(old != new)
            gaps = (np.diff(idx, prepend=-1) - 1).astype(np.uint32)
            delta = codec.ulp_delta(old[idx], new[idx], True)
            tot["changed"] += idx.size
            tot["numel"] += n
            tot["zstd19_planes"] += len(z.compress(planes(gaps))) + len(z.compress(planes(delta)))
            tot["zstd19_raw"] += len(z.compress(gaps.tobytes())) + len(z.compress(delta.tobytes()))
            for v, c in zip(*np.unique(delta, return_counts=True)):
                hist[int(v)] = hist.get(int(v), 0) + int(c)
    bound = codec.order0_bits(tot["changed"], tot["numel"], hist) / 8
    print(f"{tot['changed']:,} of {tot['numel']:,} elements changed ({tot['changed'] / tot['numel']:.3%})")
    for k in ("ans", "v2", "zstd19_planes", "zstd19_raw"):
        extra = f"; encode + decode {cpu[k]:.3f} s CPU" if k in cpu else ""
        print(f"{k:>14}: {tot[k]:>10,} bytes = {tot[k] / bound:.3f} x the order-0 bound ({bound:,.0f} bytes){extra}")


if __name__ == "__main__":
    main()
