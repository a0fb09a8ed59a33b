"""Benchmark `rlsparse diff` against the paper's approach, side by side in one run.

Baseline: load both models whole with transformers and diff tensor by tensor in memory (what
the paper's public script does), at the paper's single tolerance 1e-5.
Ours: `rlsparse diff` with all five tolerances, every aggregate, the JSON and the mask.

Runs, each in a fresh subprocess so peak resident memory (ru_maxrss) is its own:
  1. warm page cache, ~850M-parameter bf16 Llama-shaped pair: baseline, then ours;
  2. the same pair with a cold page cache (evicted with POSIX_FADV_DONTNEED): `dd` reading
     the same files, then ours, alternating three times (medians: the disk's speed varies);
  3. a pair 3x larger: ours only, peak memory.

With ``--before SRC`` (an older checkout's ``src``, e.g. ``git archive <commit> src | tar -x``)
the older engine runs beside ours in every round, and ours also runs with O_DIRECT cold reads
switched on ("ours, O_DIRECT cold reads"), so what each step bought is measured side by side.

Usage: python bench/bench_diff.py [--data DIR] [--params 850e6] [--rounds 3] [--before SRC]
                                  [--skip-baseline] [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import evict, warm, write_pair  # noqa: E402

# The paper's procedure (its public script, re-expressed here): load both models whole in bf16 with
# transformers, take each parameter's delta in the stored dtype, concatenate all deltas, count the
# zeros and, per tolerance, the deltas within it; per-layer ratios from per-tensor counts.
BASELINE = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
a = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
b = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
sa, sb = a.state_dict(), b.state_dict()
deltas, per_tensor = [], {}
with torch.no_grad():
    for name, _ in a.named_parameters():
        d = sb[name] - sa[name]
        per_tensor[name] = (d != 0).sum().item() / d.numel()
        deltas.append(d.view(-1))
    flat = torch.cat(deltas)
    zeros = (flat == 0).sum().item()
    within = torch.isclose(flat, torch.zeros_like(flat), atol=1e-5).sum().item()
print(f"RESULT {flat.numel()} {flat.numel() - within} {time.perf_counter() - t0:.3f}")
"""


def _run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout). Peak RSS comes from GNU time, whose child is
    forked from a small process: ru_maxrss of a child forked from this (large) Python process
    would include the memory it had before exec."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    kb = int(next(x for x in proc.stderr.splitlines() if x.startswith("MAXRSS_KB")).split()[1])
    return wall, kb * 1024, proc.stdout


# ours with O_DIRECT cold reads switched on or off: the same CLI, the stream engine's switch set
_WITH_DIRECT = ("import sys; import rlsparse.diff.stream as s; s.DIRECT_READS = {}; "
                "from rlsparse.cli.main import main; sys.exit(main(sys.argv[1:]))")
SRC = Path(__file__).resolve().parent.parent / "src"


def ours(base: Path, ft: Path, out: Path, src: Path = SRC, direct: bool | None = None) -> dict:
    """One `rlsparse diff` run of the tree at ``src`` (ours, or an older checkout for before/after);
    ``direct`` sets O_DIRECT cold reads on/off (None: the engine's default)."""
    head = ([sys.executable, "-m", "rlsparse"] if direct is None
            else [sys.executable, "-c", _WITH_DIRECT.format(direct)])
    cmd = ["env", f"PYTHONPATH={src}", *head, "diff", str(base), str(ft), "--quiet", "--json",
           str(out / "diff.json"), "--save-mask", str(out / "mask.safetensors")]
    wall, rss, _ = _run_measured(cmd)
    doc = json.loads((out / "diff.json").read_text())
    return {"wall_s": wall, "engine_s": doc["elapsed_s"], "bytes": doc["bytes_read"], "peak_rss": rss,
            "gbps": doc["bytes_read"] / doc["elapsed_s"] / 1e9, "gbps_wall": doc["bytes_read"] / wall / 1e9,
            "changed_1e-05": doc["total"]["changed"]["1e-05"], "numel": doc["total"]["numel"]}


def baseline(base: Path, ft: Path) -> dict:
    wall, rss, out = _run_measured([sys.executable, "-c", BASELINE, str(base), str(ft)])
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    total, changed, _ = line.split()[1:]
    return {"wall_s": wall, "peak_rss": rss, "numel": int(total), "changed_1e-05": int(changed)}


def dd(paths: list[Path]) -> float:
    files = [f for p in paths for f in sorted(p.glob("*.safetensors"))]
    nbytes = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    return nbytes / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/benchdata", help="where synthetic checkpoints are written (reused)")
    ap.add_argument("--params", type=float, default=850e6, help="parameters per side (e.g. 100e6 for a quick run)")
    ap.add_argument("--rounds", type=int, default=3, help="cold rounds (dd and each engine, alternating)")
    ap.add_argument("--before", type=Path, help="src folder of an older checkout to run beside ours")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    data = Path(args.data)
    out = data / "out"
    out.mkdir(parents=True, exist_ok=True)
    gb = 1e9

    base, ft, n = write_pair(data / f"p{int(args.params / 1e6)}", args.params)
    print(f"pair: {n / 1e6:.0f}M parameters per side, bf16, 20% of elements changed; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    variants = {"ours": lambda: ours(base, ft, out)}
    if args.before:
        variants["before"] = lambda: ours(base, ft, out, src=args.before.resolve())
        variants["ours, O_DIRECT cold reads"] = lambda: ours(base, ft, out, direct=True)
    rows = []
    warm_runs = {}
    for name, fn in variants.items():
        warm([base, ft])
        warm_runs[name] = fn()
        rows.append((f"{name}, warm cache", warm_runs[name]))
    o = warm_runs["ours"]
    if not args.skip_baseline:
        warm([base, ft])
        b = baseline(base, ft)
        rows.append(("baseline (transformers, in memory), warm", b))
        assert b["numel"] == o["numel"], "baseline and ours compared different element counts"
        agree = "agree" if b["changed_1e-05"] == o["changed_1e-05"] else "differ: the baseline subtracts in bf16"
        print(f"changed at 1e-5: baseline {b['changed_1e-05']:,}, ours {o['changed_1e-05']:,} ({agree})")
    # the disk behind this machine serves a cold read at very different speeds from one minute to
    # the next: alternate dd and every engine, ``rounds`` times each, and compare medians
    dd_runs: list[float] = []
    cold_runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        evict([base, ft])
        dd_runs.append(dd([base, ft]))
        for name, fn in variants.items():
            evict([base, ft])
            cold_runs[name].append(fn())
    dd_gbps = sorted(dd_runs)[len(dd_runs) // 2]
    print("cold runs, GB/s: dd " + ", ".join(f"{x:.2f}" for x in dd_runs) + "; " + "; ".join(
        f"{name} " + ", ".join(f"{r['gbps']:.2f}" for r in runs) for name, runs in cold_runs.items()))
    cold = {name: sorted(runs, key=lambda r: r["gbps"])[len(runs) // 2] for name, runs in cold_runs.items()}
    for name, r in cold.items():
        rows.append((f"{name}, cold cache (median of {args.rounds})", r))
    if not args.skip_large:
        lb, lf, ln = write_pair(data / f"p{int(3 * args.params / 1e6)}", 3 * args.params)
        evict([lb, lf])
        rows.append((f"ours, {ln / 1e9:.2f}B pair (3x), cold", ours(lb, lf, out)))

    print(f"\n{'run':52s} {'wall s':>8s} {'engine s':>9s} {'GB/s':>6s} {'peak RSS':>10s}")
    for name, r in rows:
        gbps = f"{r['gbps']:.2f}" if "gbps" in r else "-"
        eng = f"{r['engine_s']:.2f}" if "engine_s" in r else "-"
        print(f"{name:52s} {r['wall_s']:8.2f} {eng:>9s} {gbps:>6s} {r['peak_rss'] / gb:9.2f}G")
    print()
    if not args.skip_baseline:
        print(f"speed-up vs baseline (wall, ours incl. start-up): {b['wall_s'] / o['wall_s']:.1f}x  (target >= 20x)")
    print(f"throughput warm (engine): {o['gbps']:.2f} GB/s; incl. process start-up: {o['gbps_wall']:.2f} GB/s "
          "(target >= 2.4 GB/s)")
    for name, r in cold.items():
        print(f"cold (medians): dd reads {dd_gbps:.2f} GB/s, {name} {r['gbps']:.2f} GB/s: "
              f"dd/{name} = {dd_gbps / r['gbps']:.2f} (target <= 1.15)")
    if "before" in warm_runs:
        print(f"after/before: warm {o['gbps'] / warm_runs['before']['gbps']:.2f}x, "
              f"cold {cold['ours']['gbps'] / cold['before']['gbps']:.2f}x")
    peak = max(r["peak_rss"] for name, r in rows if name.startswith("ours"))
    print(f"peak RSS, ours: {peak / gb:.2f} GB over all sizes (target <= 1 GB)")


if __name__ == "__main__":
    main()
