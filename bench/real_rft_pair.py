"""A real RFT checkpoint pair for ``bench/bench_delta.py``: the lab's runner on the real base.

RFT = SFT on the base's own correct sampled replies. The recipe (``bench/recipes/rft_lr1e-6_30.json``:
2-digit addition through the chat template, 4 samples per prompt at temperature 0.7, 30 steps at
lr 1e-6, batch 8) runs through ``rlsparse.lab.runner.run_lab`` with the real-base suite's settings
(chat prompts, 12-token replies, quick test sets: 400 addition and 120 multiplication problems), fp32
master weights, checkpoint saved in bf16: exactly what the lab does for its own cells. The lab CLI
cannot do this with ``--model`` (that path uses the tiny base's plain prompts), hence this script.

    RLSPARSE_LAB_CACHE=/work/labcache python bench/real_rft_pair.py --out /tmp/delta-real-rft
    python bench/bench_delta.py --no-synthetic --no-real \\
        --pair /work/labcache/real-smollm2-135m-* /tmp/delta-real-rft/runs/rft_lr1e-6_30/lr-1e-6
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, help="lab run folder to create (or continue with --resume)")
    ap.add_argument("--recipe", default=str(HERE / "recipes" / "rft_lr1e-6_30.json"))
    ap.add_argument("--cache-dir", default=None, help="lab cache holding the converted real base")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    from rlsparse.lab.runner import LabOptions, run_lab

    opts = LabOptions(out=Path(args.out), real_base="smollm2-135m", cache_dir=args.cache_dir, quick=True,
                      conjecture=False, report=False, trace=False, threads=args.threads, progress="lines")
    run_lab([args.recipe], opts, resume=args.resume)


if __name__ == "__main__":
    main()
