"""Seconds per update matrix for `rlsparse rank` (torch.linalg.svdvals, float32).

Run: PYTHONPATH=src python bench/bench_rank.py [--device cpu|cuda] [--repeats 3] [--sizes 4096x4096,4096x14336]

Reports, per shape, the median wall time of the SVD step alone (``svdvals``) and of the whole
per-matrix computation (``matrix_ranks``: svdvals + rank, stable and effective rank). Inputs
are dense random deltas (the worst case; sparsity does not make a dense SVD faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _time(fn, device: str, repeats: int) -> float:
    import torch

    out = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> None:
    import torch

    from rlsparse.analysis.rank import matrix_ranks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", default="4096x4096,4096x14336")
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, repeats {args.repeats} (median)")
    g = torch.Generator().manual_seed(0)
    for m, n in shapes:
        d = (torch.randn(m, n, generator=g) * 1e-3).to(args.device)
        torch.linalg.svdvals(d[:64, :64])  # warm up the kernels
        t_svd = _time(lambda: torch.linalg.svdvals(d), args.device, args.repeats)
        t_all = _time(lambda: matrix_ranks(d), args.device, args.repeats)
        print(f"{m}x{n}: svdvals {t_svd:.2f} s/matrix, matrix_ranks {t_all:.2f} s/matrix")


if __name__ == "__main__":
    main()
