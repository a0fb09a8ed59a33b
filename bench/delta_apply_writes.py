"""`rlsparse delta apply` writing through the page cache vs with O_DIRECT, beside the disk's floor.

Every way must end with the output on disk (``fsync``). Per pair, in fresh child processes,
alternated ``--repeat`` times so every way sees the same machine (warm cache for the inputs):

- ``copy, cached``: the finetuned weight files copied into new files (``shutil.copyfile``: the
  kernel copies) and fsynced: the least any apply that writes through the page cache does;
- ``copy, O_DIRECT``: the same bytes read from the page cache and written with O_DIRECT from
  page-aligned buffers, two processes, then fsynced: the disk's own floor for this output;
- ``apply, cached`` / ``apply, O_DIRECT`` / ``apply, auto``: ``rlsparse.delta.apply`` with
  ``direct=False`` / ``True`` / ``None`` (its size rule).

Prints per way: best and median wall time, GB/s of output bytes, least CPU seconds (the child
and its workers), peak RSS; then apply's best against the floors.

    python bench/delta_apply_writes.py BASE FT [--pair BASE2 FT2] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import warm  # noqa: E402

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

ONE = r"""
import json, mmap, os, resource, shutil, sys, time
import constriction, xxhash, zstandard  # imported before the clock
import rlsparse.delta as d
way, base, src, out = sys.argv[1:5]
shutil.rmtree(out, ignore_errors=True)  # the last run's output, before the clock starts
os.sync()
s0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
t = time.perf_counter()
if way.startswith("apply"):
    direct = {"apply, cached": False, "apply, O_DIRECT": True, "apply, auto": None}[way]
    nbytes = d.apply(base, src, out, direct=direct).bytes_written
else:
    os.makedirs(out)
    files = sorted(p for p in os.listdir(src) if p.endswith(".safetensors"))
    nbytes = 0
    for name in files:
        a, b = os.path.join(src, name), os.path.join(out, name)
        size = os.path.getsize(a)
        nbytes += size
        if way == "copy, cached":
            shutil.copyfile(a, b)
            fd = os.open(b, os.O_WRONLY)
        else:  # two processes, each every other 8 MiB piece, O_DIRECT from an aligned buffer
            fd = os.open(b, os.O_WRONLY | os.O_CREAT, 0o600)
            piece = 8 << 20
            kids = []
            for k in range(2):
                pid = os.fork()
                if pid == 0:
                    buf = mmap.mmap(-1, piece)
                    rfd, dfd = os.open(a, os.O_RDONLY), os.open(b, os.O_WRONLY | os.O_DIRECT)
                    for at in range(k * piece, size, 2 * piece):
                        n = os.preadv(rfd, [buf], at)
                        whole = n // 4096 * 4096
                        if whole:
                            os.pwrite(dfd, memoryview(buf)[:whole], at)
                        if n > whole:  # the file's last partial page: cached
                            os.pwrite(fd, memoryview(buf)[whole:n], at + whole)
                    os._exit(0)
                kids.append(pid)
            for pid in kids:
                _, status = os.waitpid(pid, 0)
                if status:
                    raise SystemExit("a copying process failed")
        os.fsync(fd)
        os.close(fd)
wall = time.perf_counter() - t
s1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((s0, s1), (c0, c1)) for f in ("ru_utime", "ru_stime"))
rss = max(s1.ru_maxrss, c1.ru_maxrss) / 1024
print(json.dumps({"way": way, "wall_s": wall, "bytes": nbytes, "cpu_s": cpu, "rss_mb": rss,
                  "load": os.getloadavg()[0]}))
"""

WAYS = ("copy, cached", "copy, O_DIRECT", "apply, cached", "apply, O_DIRECT", "apply, auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("BASE", "FT"), help="another pair")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tmp", default=None, help="scratch folder on the disk to measure (default: a new temporary folder)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    report = []
    with tempfile.TemporaryDirectory(prefix="delta-writes-", dir=args.tmp) as tmp:
        for base, ft in [(args.base, args.finetuned), *args.pair]:
            patch, out = Path(tmp) / "p.rlpatch", Path(tmp) / "out"
            subprocess.run([sys.executable, "-m", "rlsparse.cli.main", "delta", "pack", base, ft, "-o", str(patch),
                            "--overwrite", "--quiet"], check=True, env=env)
            rows = []
            for _ in range(args.repeat):
                for way in WAYS:
                    warm([base, ft])
                    src = str(patch) if way.startswith("apply") else ft
                    proc = subprocess.run([sys.executable, "-c", ONE, way, base, src, str(out)], capture_output=True,
                                          text=True, env=env)
                    if proc.returncode:
                        raise SystemExit(f"{way} failed: {proc.stderr.strip().splitlines()[-1]}")
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            report.append({"base": base, "finetuned": ft, "rows": rows})
            show(ft, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"schema_version": 1, "cpus": os.cpu_count(), "pairs": report}, indent=2))


def show(ft: str, rows: list[dict]) -> None:
    nbytes = rows[0]["bytes"]
    print(f"\n{ft}: {nbytes / 1e9:.2f} GB of weights, {len(rows) // len(WAYS)} runs per way (load "
          f"{min(r['load'] for r in rows):.1f}-{max(r['load'] for r in rows):.1f})")
    print(f"{'way':16} {'best s':>7} {'GB/s':>5} {'median s':>8} {'GB/s':>5} {'least CPU s':>11} {'peak RSS MB':>11}")
    best = {}
    for way in WAYS:
        got = [r for r in rows if r["way"] == way]
        walls = [r["wall_s"] for r in got]
        best[way] = min(walls)
        med = statistics.median(walls)
        print(f"{way:16} {best[way]:7.3f} {nbytes / best[way] / 1e9:5.2f} {med:8.3f} {nbytes / med / 1e9:5.2f} "
              f"{min(r['cpu_s'] for r in got):11.2f} {max(r['rss_mb'] for r in got):11.0f}")
    for way in ("apply, cached", "apply, O_DIRECT", "apply, auto"):
        print(f"{way}: best wall {best[way] / best['copy, cached']:.2f}x the cached copy's, "
              f"{best[way] / best['copy, O_DIRECT']:.2f}x the O_DIRECT copy's")


if __name__ == "__main__":
    main()
