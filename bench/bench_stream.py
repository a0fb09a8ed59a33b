"""Benchmark the analyses that run on the stream engine, before/after, side by side in one run.

On a synthetic bf16 Llama-shaped pair (``synthetic.write_pair``) plus ``--checkpoints`` extra
checkpoints derived from the finetuned side (each flips the low bit of a further 2% of the
elements, so consecutive checkpoints differ), every command runs in a fresh subprocess with a
warm page cache, once with our tree and once with ``--before`` (an older checkout's ``src``):

  series     BASE CK_1..CK_n          (n = --checkpoints, default 10)
  overlap    --from-checkpoints BASE FT BASE CK_1   (4 checkpoints)
  precision  BASE FT
  diff       BASE FT, and diff --ray (a local Ray cluster on this machine's CPUs)

Reported: wall and engine seconds, GB/s read by the engine, peak RSS of the command's process
(GNU time; for --ray that is the driver, the workers are Ray's own processes). For the series,
its cost is set beside one diff's: "about what n reads cost" means series time ~ n x diff time
or less (the series reads n + 1 files once; n diffs would read 2n).

Usage: python bench/bench_stream.py [--data DIR] [--params 100e6] [--checkpoints 10] [--before SRC] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_diff import SRC, _run_measured  # noqa: E402
from synthetic import warm, write_pair  # noqa: E402


def derive_checkpoints(ft: Path, root: Path, n: int, seed: int = 1) -> list[Path]:
    """``n`` checkpoints: copies of ``ft`` where checkpoint k flips the low bit of a further 2%
    of the elements (cumulative); reused when present."""
    from rlsparse.io.checkpoint import Checkpoint

    out = [root / f"checkpoint-{k + 1}" for k in range(n)]
    if all((p / "DONE").exists() for p in out):
        return out
    ck = Checkpoint.open(ft)
    rng = np.random.default_rng(seed)
    files = sorted({t.file for t in ck.tensors.values()})
    data = {f: np.fromfile(f, dtype=np.uint8) for f in files}
    for k, path in enumerate(out):
        path.mkdir(parents=True, exist_ok=True)
        for f in ft.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, path / f.name)
        for f in files:
            raw = data[f]
            for t in ck.tensors.values():
                if t.file != f or t.dtype != "BF16":
                    continue
                v = raw[t.offset:t.offset + t.nbytes].view(np.uint16)
                idx = rng.integers(0, v.size, size=max(1, v.size // 50))
                v[idx] ^= 1
            raw.tofile(path / f.name)
        (path / "DONE").write_text("ok")
    return out


def measure(src: Path, args: list[str], json_path: Path) -> dict:
    """One command of the tree at ``src``: wall seconds, peak RSS, and the JSON it wrote."""
    wall, rss, _ = _run_measured(["env", f"PYTHONPATH={src}", sys.executable, "-m", "rlsparse", *args, "--quiet",
                                  "--json", str(json_path)])
    doc = json.loads(json_path.read_text())
    return {"wall_s": wall, "peak_rss": rss, "doc": doc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/benchdata", help="where synthetic checkpoints are written (reused)")
    ap.add_argument("--params", type=float, default=100e6, help="parameters per side (the pair of bench_diff: 850e6)")
    ap.add_argument("--checkpoints", type=int, default=10, help="checkpoints in the series")
    ap.add_argument("--before", type=Path, help="src folder of an older checkout to run beside ours")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    data = Path(args.data)
    out = data / "out"
    out.mkdir(parents=True, exist_ok=True)
    base, ft, n = write_pair(data / f"p{int(args.params / 1e6)}", args.params)
    cks = derive_checkpoints(ft, data / f"p{int(args.params / 1e6)}" / "series", args.checkpoints)
    pair_bytes = 2 * 2 * n
    print(f"pair: {n / 1e6:.0f}M parameters per side, bf16; series of {len(cks)} checkpoints; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    warm([base, ft, *cks])
    trees = {"ours": SRC}
    if args.before:
        trees["before"] = args.before.resolve()
    jobs = {
        "diff": ["diff", str(base), str(ft)],
        f"series ({len(cks)} checkpoints)": ["series", str(base), *map(str, cks)],
        "overlap --from-checkpoints (4)": ["overlap", "--from-checkpoints", str(base), str(ft), str(base), str(cks[0])],
        "precision": ["precision", str(base), str(ft)],
    }
    rows = []
    results: dict[tuple[str, str], dict] = {}
    for job, argv in jobs.items():
        for tree, src in trees.items():
            r = measure(src, argv, out / "stream.json")
            results[job, tree] = r
            rows.append((f"{job}, {tree}", r))
    if not args.skip_ray:
        t0 = time.perf_counter()
        r = measure(SRC, ["diff", str(base), str(ft), "--ray"], out / "ray.json")
        r["note"] = f"incl. starting a local Ray cluster ({time.perf_counter() - t0:.1f} s wall in all)"
        results["diff --ray", "ours"] = r
        rows.append(("diff --ray (local cluster), ours", r))
        a, b = dict(results["diff", "ours"]["doc"]), dict(r["doc"])
        for d in (a, b):
            d.pop("elapsed_s")
        print("diff --ray JSON equals the local run's (elapsed_s aside):", a == b)

    print(f"\n{'run':46s} {'wall s':>8s} {'engine s':>9s} {'GB/s':>6s} {'peak RSS':>9s}")
    for name, r in rows:
        doc = r["doc"]
        eng = doc.get("elapsed_s")
        nbytes = doc.get("bytes_read")
        gbps = f"{nbytes / eng / 1e9:.2f}" if eng and nbytes else "-"
        print(f"{name:46s} {r['wall_s']:8.2f} {eng if eng is None else round(eng, 2)!s:>9s} {gbps:>6s} "
              f"{r['peak_rss'] / 1e9:8.2f}G")
    print()
    for job in jobs:
        if (job, "before") in results:
            print(f"{job}: before/after wall = {results[job, 'before']['wall_s'] / results[job, 'ours']['wall_s']:.2f}x")
    s = results[f"series ({len(cks)} checkpoints)", "ours"]["wall_s"]
    d = results["diff", "ours"]["wall_s"]
    print(f"series of {len(cks)}: {s:.1f} s wall = {s / d:.1f} x one diff ({d:.1f} s); "
          f"{len(cks)} separate diffs would read {len(cks) * pair_bytes / 1e9:.1f} GB, the series reads "
          f"{(len(cks) + 1) * pair_bytes / 2e9:.1f} GB")
    if ("diff --ray", "ours") in results:
        ray = results["diff --ray", "ours"]
        print(f"diff --ray vs single process: wall {ray['wall_s']:.1f} s vs {d:.1f} s; engine "
              f"{ray['doc']['elapsed_s']:.1f} s vs {results['diff', 'ours']['doc']['elapsed_s']:.1f} s ({ray['note']})")


if __name__ == "__main__":
    main()
