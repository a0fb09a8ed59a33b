"""Patch size and speed of ``rlsparse delta`` beside the baselines, per checkpoint pair, in one run.

Per pair: our patch vs zstd -9 of the XOR of the two checkpoints' tensor bytes, the int32 index +
value encoding that weight-sync systems send (6 bytes per changed bf16 element), ZipNN of the
finetuned weights, the order-0 bound (positions at the measured density + entropy of the changes
counted in units in the last place), and weightscope's lossless ``.wsp`` (``--threshold 0``).
Every tool runs in its own child process, so its wall time and peak RSS are its own (the child's
``VmHWM``, read by the child itself at its end: ``wait4`` would report the parent's size at fork,
which is large after writing a synthetic pair); pack and apply are timed on a warm page cache
(files read once first), best of ``--repeat`` runs, each into a new output, with the coder's
libraries imported before the clock starts (as the baselines' are). Speeds are checkpoint bytes (the finetuned
weights) per second of the library call. Our apply's output is checked bit-identical to the
finetuned checkpoint (``rlsparse.diff``: 0 elements whose bits differ).

    python bench/bench_delta.py                       # synthetic 50M-parameter pair (+ real pairs found)
    python bench/bench_delta.py --synthetic 850e6     # the 850M pair of bench/synthetic.py
    python bench/bench_delta.py --pair BASE FT --pair FT FT2 --no-synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import warm  # noqa: E402  (bench/ on the path: its own helpers)

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
REAL_BASE = "/work/labcache/real-smollm2-135m-b179c9523d0e"
REAL_RUNS = "/tmp/delta-real"  # written by bench/real_pairs.py
REAL_RFT = "/tmp/delta-real-rft/runs/rft_lr1e-6_30/lr-1e-6"  # bench/real_rft_pair.py
REAL_GRPO = "/tmp/delta-real-grpo-{}/ckpt"  # per-step checkpoints of bench/bench_sync_grpo.py


HWM = """
import resource as _resource
def _cpu_s():
    me, kids = _resource.getrusage(_resource.RUSAGE_SELF), _resource.getrusage(_resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
def _workers_hwm_mb():  # the largest worker process's peak (its VmHWM counts what it shares with us too)
    return _resource.getrusage(_resource.RUSAGE_CHILDREN).ru_maxrss / 1024
def _hwm_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


def run_child(code: str) -> tuple[float, float, dict]:
    """Run ``code`` in a child Python; (wall seconds, peak RSS in MB, its last JSON line). The
    peak RSS is the ``rss_MB`` the child reports (its own VmHWM), else ``wait4``'s."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {err.decode()[-2000:]}")
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    doc = json.loads(lines[-1]) if lines else {}
    return seconds, doc.get("rss_MB", usage.ru_maxrss / 1024), doc


PACK = HWM + """
import json, time, rlsparse.delta as d
import constriction, xxhash, zstandard  # imported before the clock starts, like the baselines' libraries
from rlsparse.delta import codec
t, c = time.perf_counter(), _cpu_s()
r = d.pack({base!r}, {ft!r}, {out!r}, ulp_hist={hist}, files=False, workers={workers}, parallel={parallel!r})
res = {{"seconds": time.perf_counter() - t, "cpu_s": _cpu_s() - c, "bytes": r.patch_bytes, "changed": r.changed,
        "numel": r.numel, "read": r.bytes_read, "ft_bytes": r.manifest.stats["finetuned_bytes"], "rss_MB": _hwm_mb(),
        "worker_rss_MB": _workers_hwm_mb()}}
if {hist}:
    res["bound"] = codec.order0_bits(r.changed, r.numel, r.ulp_hist) / 8
print(json.dumps(res))
"""

APPLY = HWM + """
import json, time, rlsparse.delta as d
import constriction, xxhash, zstandard  # imported before the clock starts, like the baselines' libraries
t, c = time.perf_counter(), _cpu_s()
r = d.apply({base!r}, {patch!r}, {out!r}, overwrite=True, workers={workers}, parallel={parallel!r})
print(json.dumps({{"seconds": time.perf_counter() - t, "cpu_s": _cpu_s() - c, "bytes": r.bytes_written,
                  "rss_MB": _hwm_mb(), "worker_rss_MB": _workers_hwm_mb()}}))
"""

VERIFY = """
import json, rlsparse
r = rlsparse.diff({a!r}, {b!r}, tolerances=[0])
print(json.dumps({{"bit_changed": sum(t.bit_changed or 0 for t in r.tensors.values())}}))
"""

XOR_ZSTD = HWM + """
import json, time, numpy as np, zstandard
from rlsparse.io.checkpoint import Checkpoint
from rlsparse.io.reader import TensorReader
a, b = Checkpoint.open({base!r}), Checkpoint.open({ft!r})
ra, rb = TensorReader(), TensorReader()
t = time.perf_counter()
size = 0
cctx = zstandard.ZstdCompressor(level=9)
with cctx.stream_writer(open("/dev/null", "wb"), closefd=True) as w:
    counter = cctx  # sizes come from the writer's tell()
    for name, ib in sorted(b.tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].offset or 0)):
        ia = a.tensors.get(name)
        step = 4 << 20
        for s in range(0, ib.numel, step):
            n = min(step, ib.numel - s)
            x = rb.read(ib, s, n).copy()
            if ia is not None and ia.dtype == ib.dtype and ia.shape == ib.shape:
                x ^= ra.read(ia, s, n)
            w.write(x.tobytes())
    w.flush(zstandard.FLUSH_FRAME)
    size = w.tell()
print(json.dumps({{"seconds": time.perf_counter() - t, "bytes": size, "rss_MB": _hwm_mb()}}))
"""

ZIPNN = HWM + """
import json, time, zipnn
from rlsparse.io.checkpoint import Checkpoint
from rlsparse.io.reader import TensorReader
b = Checkpoint.open({ft!r})
r = TensorReader()
z = zipnn.ZipNN(bytearray_dtype="bfloat16", input_format="byte")
t = time.perf_counter()
size = 0
for name, ib in sorted(b.tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].offset or 0)):
    step = 64 << 20
    for s in range(0, ib.numel, step):
        n = min(step, ib.numel - s)
        size += len(z.compress(r.read(ib, s, n).tobytes()))
print(json.dumps({{"seconds": time.perf_counter() - t, "bytes": size, "rss_MB": _hwm_mb()}}))
"""


def weightscope(base: str, ft: str, tmp: Path) -> dict:
    exe = shutil.which("weightscope")
    if exe is None:
        return {}
    wsp = tmp / "p.wsp"
    t_exp, rss_exp, _ = run_child(WRAP.format(argv=[exe, "export", base, ft, "-o", str(wsp), "--threshold", "0"]))
    out = tmp / "ws.safetensors"
    t_app, rss_app, _ = run_child(WRAP.format(argv=[exe, "apply", str(wsp), base, "-o", str(out)]))
    _, _, v = run_child(VERIFY.format(a=ft, b=str(out)))
    return {"bytes": wsp.stat().st_size, "export_s": t_exp, "apply_s": t_app, "export_rss_MB": rss_exp,
            "apply_rss_MB": rss_app, "bit_exact": v["bit_changed"] == 0}


WRAP = """
import json, resource, subprocess, sys
rc = subprocess.call({argv!r}, stdout=subprocess.DEVNULL)
if rc:
    sys.exit(rc)
print(json.dumps({{"rss_MB": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""


def bench_pair(label: str, base: str, ft: str, tmp: Path, workers: int, with_ws: bool, repeat: int = 1,
               parallel: str = "auto") -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    patch = tmp / "p.rlpatch"
    load_before = os.getloadavg()[0]
    _, _, sizes = run_child(PACK.format(base=base, ft=ft, out=str(patch), hist=True, workers=workers, parallel=parallel))
    packs, applies = [], []
    for _ in range(max(1, repeat)):  # best of ``repeat``: the machine is shared
        warm([base, ft])
        packs.append(run_child(PACK.format(base=base, ft=ft, out=str(patch), hist=False, workers=workers,
                                              parallel=parallel)))
        warm([base, patch])
        shutil.rmtree(tmp / "out", ignore_errors=True)  # a new folder each time: no old one to replace
        os.sync()  # the removal's own disk work (ext4 here discards freed blocks) done before the clock
        applies.append(run_child(APPLY.format(base=base, patch=str(patch), out=str(tmp / "out"), workers=workers,
                                                   parallel=parallel)))
    t_pack, rss_pack, timed = min(packs, key=lambda r: r[2]["seconds"])
    t_apply, rss_apply, applied = min(applies, key=lambda r: r[2]["seconds"])
    _, _, verify = run_child(VERIFY.format(a=ft, b=str(tmp / "out")))
    warm([base, ft])
    _, rss_xor, xor = run_child(XOR_ZSTD.format(base=base, ft=ft))
    _, rss_znn, znn = run_child(ZIPNN.format(ft=ft))
    ws = weightscope(base, ft, tmp) if with_ws else {}
    ft_bytes = timed["ft_bytes"]
    row = {
        "pair": label, "base": base, "finetuned": ft, "numel": sizes["numel"], "changed": sizes["changed"],
        "density": sizes["changed"] / sizes["numel"], "ours_bytes": sizes["bytes"], "zstd9_xor_bytes": xor["bytes"],
        "zstd9_xor_s": xor["seconds"], "zstd9_xor_rss_MB": rss_xor, "index_value_bytes": sizes["changed"] * 6,
        "zipnn_bytes": znn["bytes"], "zipnn_s": znn["seconds"], "zipnn_rss_MB": rss_znn,
        "order0_bound_bytes": sizes["bound"], "weightscope": ws,
        "ours_vs_bound": sizes["bytes"] / sizes["bound"] if sizes["bound"] else None,
        "pack_s": timed["seconds"], "pack_GBps": ft_bytes / timed["seconds"] / 1e9, "pack_rss_MB": rss_pack,
        "pack_cpu_s": timed["cpu_s"], "pack_worker_rss_MB": timed["worker_rss_MB"],
        "pack_process_s": t_pack, "apply_s": applied["seconds"], "apply_GBps": ft_bytes / applied["seconds"] / 1e9,
        "apply_rss_MB": rss_apply, "apply_cpu_s": applied["cpu_s"], "apply_worker_rss_MB": applied["worker_rss_MB"],
        "apply_process_s": t_apply, "parallel": parallel, "bit_exact": verify["bit_changed"] == 0,
        "checkpoint_bytes": ft_bytes, "repeat": max(1, repeat), "workers": workers,
        "pack_s_all": [r[2]["seconds"] for r in packs], "apply_s_all": [r[2]["seconds"] for r in applies],
        "load_average": [load_before, os.getloadavg()[0]],
    }
    shutil.rmtree(tmp / "out", ignore_errors=True)
    return row


def mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def _rss(r: dict) -> str:
    """Peak RSS of pack / apply: the process, and '+ n x w' for n worker processes whose largest
    peaked at w (a worker's peak counts the pages it shares with its parent: an upper bound)."""
    def one(kind: str) -> str:
        w = r[f"{kind}_worker_rss_MB"]
        extra = f"+{r['workers']}x{w:.0f}" if w else ""
        return f"{r[f'{kind}_rss_MB']:.0f}{extra}"

    return f"{one('pack')} / {one('apply')}"


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="rlsparse delta vs baselines (sizes in MB; speeds: checkpoint GB per second, warm cache)")
    for col in ("pair", "changed", "ours", "zstd-9 XOR", "idx+val", "ZipNN", "order-0", "ours/bound",
                "weightscope", "pack GB/s", "apply GB/s", "CPU s pack/apply", "RSS pack/apply MB", "bit-exact", "load"):
        t.add_column(col, justify="left" if col == "pair" else "right")
    for r in rows:
        ws = r["weightscope"]
        ws_txt = (f"{mb(ws['bytes'])} ({ws['export_s']:.0f}s/{ws['apply_s']:.0f}s"
                  f"{'' if ws.get('bit_exact') else ', NOT exact'})") if ws else "-"
        t.add_row(r["pair"], f"{r['density']:.3%}", mb(r["ours_bytes"]), mb(r["zstd9_xor_bytes"]),
                  mb(r["index_value_bytes"]), mb(r["zipnn_bytes"]), mb(r["order0_bound_bytes"]),
                  f"{r['ours_vs_bound']:.3f}", ws_txt, f"{r['pack_GBps']:.2f}", f"{r['apply_GBps']:.2f}",
                  f"{r['pack_cpu_s']:.2f}/{r['apply_cpu_s']:.2f}", _rss(r), "yes" if r["bit_exact"] else "NO",
                  "/".join(f"{x:.1f}" for x in r["load_average"]))
    Console(width=250).print(t)
    for r in rows:
        gb = r["checkpoint_bytes"] / 1e9
        ws = r["weightscope"]
        ws_txt = (f"; weightscope export {ws['export_s']:.1f} s ({ws['export_s'] / r['pack_s']:.0f}x our pack), "
                  f"apply {ws['apply_s']:.1f} s ({ws['apply_s'] / r['apply_s']:.0f}x our apply), RSS "
                  f"{ws['export_rss_MB']:.0f}/{ws['apply_rss_MB']:.0f} MB") if ws else ""
        print(f"{r['pair']}: ours is {r['zstd9_xor_bytes'] / r['ours_bytes']:.1f}x smaller than zstd-9 XOR, "
              f"{r['index_value_bytes'] / r['ours_bytes']:.1f}x than index+value, {r['zipnn_bytes'] / r['ours_bytes']:.1f}x "
              f"than ZipNN, {r['checkpoint_bytes'] / r['ours_bytes']:.0f}x than the checkpoint; "
              f"pack {r['pack_s']:.2f} s = {r['pack_GBps']:.2f} GB/s (target 1.0), apply {r['apply_s']:.2f} s = "
              f"{r['apply_GBps']:.2f} GB/s (target 1.5), best of {r['repeat']} ({r['parallel']}: CPU "
              f"{r['pack_cpu_s']:.2f} / {r['apply_cpu_s']:.2f} s), peak RSS {_rss(r)} MB (target 1024); zstd-9 XOR {r['zstd9_xor_s']:.1f} s = "
              f"{gb / r['zstd9_xor_s']:.2f} GB/s ({r['zstd9_xor_s'] / r['pack_s']:.1f}x our pack time), "
              f"ZipNN {r['zipnn_s']:.1f} s = {gb / r['zipnn_s']:.2f} GB/s ({r['zipnn_s'] / r['pack_s']:.1f}x our pack "
              f"time){ws_txt}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", type=float, default=50e6, help="parameters of the synthetic pair (850e6: large)")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--pair", nargs=2, action="append", metavar=("BASE", "FT"), default=[])
    ap.add_argument("--no-real", action="store_true",
                    help=f"skip the real pairs found under {REAL_RUNS}, {REAL_RFT} and {REAL_GRPO.format('*')}")
    ap.add_argument("--no-weightscope", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parallel", choices=("auto", "threads", "processes"), default="auto",
                    help="our pack/apply in worker processes or threads (default: %(default)s, as the CLI)")
    ap.add_argument("--repeat", type=int, default=3, help="pack and apply runs per pair; the best is reported")
    ap.add_argument("--tmp", default="/tmp/delta-bench")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    tmp = Path(args.tmp)
    pairs = []
    if not args.no_synthetic:
        from synthetic import write_pair

        root = tmp / f"synthetic-{args.synthetic:.0e}"
        b, f, _ = write_pair(root, args.synthetic)
        pairs.append((f"synthetic {args.synthetic / 1e6:.0f}M, 20% changed by 1-3 ULP", str(b), str(f)))
    real = Path(REAL_RUNS)
    if not args.no_real:
        for label, a, b in (("real 135M: base -> 1 step", REAL_BASE, real / "step-1"),
                            ("real 135M: step 1 -> step 2", real / "step-1", real / "step-2"),
                            ("real 135M: base -> 30 steps", REAL_BASE, real / "step-30"),
                            ("real 135M: base -> 30 RFT steps lr 1e-6", REAL_BASE, Path(REAL_RFT)),
                            ("real 135M: GRPO lr 1e-6 step 5 -> 6", *(Path(REAL_GRPO.format("1e-6"), f"step-{k}")
                                                                       for k in (5, 6))),
                            ("real 135M: GRPO lr 1e-5 step 5 -> 6", *(Path(REAL_GRPO.format("1e-5"), f"step-{k}")
                                                                       for k in (5, 6)))):
            if Path(a).exists() and Path(b).exists():
                pairs.append((label, str(a), str(b)))
    pairs += [(f"{a} -> {b}", a, b) for a, b in args.pair]
    rows = []
    for i, (label, a, b) in enumerate(pairs):
        print(f"[{i + 1}/{len(pairs)}] {label}", file=sys.stderr, flush=True)
        rows.append(bench_pair(label, a, b, tmp / f"pair-{i}", args.workers, not args.no_weightscope, args.repeat,
                               args.parallel))
    print_table(rows)
    kernels = run_child("import json\nfrom rlsparse.delta import compiled\nprint(json.dumps({'kernels': compiled.name() "
                        "if hasattr(compiled, 'name') else 'numba for large patches, else numpy'}))")[2]
    print(f"coded by: {kernels.get('kernels', '?')}")
    print(f"load average at the end: {os.getloadavg()} on {os.cpu_count()} cores (per pair: the 'load' column, "
          "before/after; on a shared machine speeds are lower bounds)")
    if args.json:
        Path(args.json).write_text(json.dumps({"schema_version": 3, "cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
