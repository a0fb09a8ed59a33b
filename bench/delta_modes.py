"""`rlsparse delta` pack and apply on worker threads vs worker processes, side by side.

Each run is a fresh child process (as a CLI call would be), warm page cache; per run: wall time,
GB/s of checkpoint bytes, CPU seconds of the child and its reaped workers (``getrusage``), and
the 1-minute load average. Runs alternate between the modes so both see the same machine.

    python bench/delta_modes.py BASE FT [--repeat 3] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import warm  # noqa: E402

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

ONE = """
import json, os, resource, shutil, sys, time
import constriction, xxhash, zstandard  # imported before the clock, as in bench_delta
import rlsparse.delta as d
what, mode, base, other, out, workers = sys.argv[1:7]
if what == "apply":  # the last run's output, removed before the clock starts (not part of an apply)
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
s0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
t = time.perf_counter()
if what == "pack":
    r = d.pack(base, other, out, files=False, parallel=mode, workers=int(workers))
    nbytes = r.manifest.stats["finetuned_bytes"]
else:
    r = d.apply(base, other, out, parallel=mode, workers=int(workers))
    nbytes = r.bytes_written
wall = time.perf_counter() - t
s1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((s0, s1), (c0, c1)) for f in ("ru_utime", "ru_stime"))
print(json.dumps({"what": what, "mode": mode, "wall_s": wall, "GBps": nbytes / wall / 1e9, "cpu_s": cpu,
                  "load": os.getloadavg()[0]}))
"""


# which code codes the chunks (the C kernels, or numpy where they were not built; before the
# seventh round: numba for large patches, else numpy)
KERNELS = """
from rlsparse.delta import compiled
print(compiled.name() if hasattr(compiled, "name") else "numba for large patches, else numpy")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
        run(args, Path(args.tmp))
    else:  # its own scratch folder (a patch and an output as large as the checkpoint): removed at the end
        with tempfile.TemporaryDirectory(prefix="delta-modes-") as tmp:
            run(args, Path(tmp))


def run(args, tmp: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    patch, out = tmp / "p.rlpatch", tmp / "out"
    kernels = subprocess.run([sys.executable, "-c", KERNELS], capture_output=True, text=True, env=env).stdout.strip()
    print(f"{SRC}: kernels {kernels or '?'}", flush=True)
    rows = []
    for _ in range(args.repeat):
        for mode in ("threads", "processes"):
            for what, a, b, dest in (("pack", args.base, args.finetuned, patch), ("apply", args.base, str(patch), out)):
                warm([a, b])
                proc = subprocess.run([sys.executable, "-c", ONE, what, mode, a, b, str(dest), str(args.workers)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode:
                    raise SystemExit(f"{what} ({mode}) failed: {proc.stderr.strip().splitlines()[-1]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{what:5} {mode:9} wall {row['wall_s']:.3f} s = {row['GBps']:.2f} GB/s, CPU {row['cpu_s']:.2f} s, "
                      f"load {row['load']:.1f}", flush=True)
    for what in ("pack", "apply"):
        for mode in ("threads", "processes"):
            got = [r for r in rows if r["what"] == what and r["mode"] == mode]
            best = min(got, key=lambda r: r["wall_s"])
            print(f"best {what} {mode}: {best['wall_s']:.3f} s = {best['GBps']:.2f} GB/s; least CPU "
                  f"{min(r['cpu_s'] for r in got):.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"schema_version": 1, "cpus": os.cpu_count(), "kernels": kernels,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
