"""``rlsparse lab run|report`` and ``rlsparse demo``: parse, validate, one library call, print."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    """Add the ``lab`` and ``demo`` subcommands to the main parser's subparsers."""
    add_lab_parser(sub)
    add_demo_parser(sub)


add_parser = add_parsers


def add_lab_parser(sub) -> None:
    lab = sub.add_parser("lab", help="the reproduction lab: run recipes on a tiny model and report",
                         description="Run the paper's experiments in miniature and report agreement.")
    labsub = lab.add_subparsers(dest="lab_command", metavar="{run,report,list,scale}")
    labsub.required = True

    run = labsub.add_parser("run", help="run one recipe, several (comma-separated) or all")
    run.add_argument("recipes", metavar="NAME|all", help="recipe name(s), recipe JSON path(s), or 'all'")
    run.add_argument("--out", metavar="RUN_DIR", default=None,
                     help="run folder (default runs/lab-<time>); a folder holding a lab run is refused without --resume")
    run.add_argument("--resume", action="store_true", help="continue the lab run already in --out")
    run.add_argument("--quick", action="store_true", help="apply each recipe's quick overrides (smoke runs)")
    run.add_argument("--model", metavar="PATH", default=None,
                     help="HF causal LM folder to finetune (default: the cached tiny base)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--dataset", metavar="JSONL", default=None,
                     help="local JSONL with prompt/answer lines, replacing the synthetic tasks")
    run.add_argument("--fp32-checkpoints", action="store_true",
                     help="save finetuned checkpoints in float32 instead of bfloat16 (the precision view)")
    run.add_argument("--compute", choices=("auto", "bf16", "fp32"), default="auto",
                     help="autocast dtype: auto = bf16 where the device computes it natively (default)")
    run.add_argument("--pure-bf16", action="store_true",
                     help="train bf16 weights directly instead of fp32 master weights")
    run.add_argument("--cache-dir", default=None, help=_CACHE_HELP)
    run.add_argument("--base", nargs="+", metavar="KEY=VALUE", default=[],
                     help="tiny-base overrides, e.g. --base hidden_size=256 intermediate_size=512 (a new cached base), "
                          "or a real pretrained base: --base smollm2-135m (needs rlsparse[real]; same as NAME 'real')")
    run.add_argument("--threads", type=_threads, default=None,
                     help="CPU threads for torch: a number or 'auto' (the machine's cores); default: the suite's "
                          "('auto' for the real base), else 1")
    run.add_argument("--jobs", type=_threads, default=None,
                     help="cells (with --grid: learning rates) run side by side in this many worker processes (each "
                          "with threads/jobs torch threads): a number or 'auto' (the cores, at most 4; 1 on cuda); "
                          "default: the suite's ('auto' for the real base), else 1")
    run.add_argument("--no-trace", action="store_true",
                     help="do not record sparsity along training (saves one fp32 copy of the model in memory)")
    run.add_argument("--no-conjecture", action="store_true", help="skip the Conjecture 1 subnetwork reruns")
    run.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                     help="progress within each training run: auto = a bar on a terminal, else a line with "
                          "steps/s and ETA every ~10 s (default: %(default)s)")
    run.add_argument("--grid", action="store_true",
                     help="run each recipe's learning-rate x steps grid (its 'grid' field: one run per learning rate, "
                          "measured at every listed step) instead of its sweep; 'all'/'real' take the recipes with a grid")
    run.add_argument("--grid-lrs", metavar="LR,LR,...", default=None,
                     help="with --grid: train only these of the grids' learning rates in this session (e.g. 5e-7,1e-6); "
                          "the others stay planned and a later --resume trains them")
    run.add_argument("--seeds", metavar="S,S,...", default=None,
                     help="run every recipe with these seeds (e.g. 0,1,2), replacing the recipes' own")
    run.set_defaults(func=_run)

    report = labsub.add_parser("report", help="render report.html and report.md for a run folder (measuring Table 4's "
                                              "pairs from its checkpoints first, cached in RUN_DIR/table4.json)")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(func=_report)

    lst = labsub.add_parser("list", help="list the built-in recipes")
    lst.set_defaults(func=_list)

    scale = labsub.add_parser("scale", help="sparsity at a matched gain vs model size, from several run folders")
    scale.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="lab run folders (e.g. one per tiny-base width)")
    scale.add_argument("--out", metavar="DIR", required=True, help="where scale.md, scale.json and the figure go")
    scale.set_defaults(func=_scale)


_CACHE_HELP = ("where the tiny base is built once and reused (default: $RLSPARSE_LAB_CACHE if set, "
               "else ~/.cache/rlsparse/lab)")


def add_demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo", help="the miniature end-to-end reproduction (minutes on CPU)",
        description="Build (or reuse) a tiny Llama base, finetune it with SFT, RFT, DPO and GRPO at three learning "
                    "rates each through TRL, diff every checkpoint, retrain the DPO and GRPO subnetworks alone "
                    "(Conjecture 1) and write report.html / report.md with each number beside the paper's. "
                    "Environment: RLSPARSE_LAB_CACHE sets the base cache folder.")
    demo.add_argument("--out", metavar="RUN_DIR", default=None,
                      help="run folder (default: runs/demo-<date>-<time>); a folder holding a run is refused "
                           "without --resume")
    demo.add_argument("--resume", action="store_true", help="continue the demo run already in --out")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: %(default)s)")
    demo.add_argument("--model", metavar="PATH", default=None,
                      help="start from this HF causal LM folder instead of the tiny base (default: the tiny base)")
    demo.add_argument("--cache-dir", default=None, help=_CACHE_HELP)
    demo.add_argument("--smoke", action="store_true",
                      help="six steps per run: checks every stage in about a minute once the base is cached "
                           "(the numbers mean nothing)")
    demo.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                     help="progress within each training run: auto = a bar on a terminal, else a line with "
                          "steps/s and ETA every ~10 s (default: %(default)s)")
    demo.add_argument("--jobs", type=_threads, default="auto",
                      help="train cells side by side in this many worker processes, one torch thread each (the same "
                           "numbers as one process): a number or 'auto' (the cores, at most 4; 1 on cuda) "
                           "(default: %(default)s)")
    demo.set_defaults(func=_demo)


def _check_out(out, resume: bool) -> None:
    """Refuse to mix two runs in one folder before any work (the lab also refuses; this is earlier)."""
    from pathlib import Path

    from rlsparse.errors import UsageError

    if out is None:
        if resume:
            raise UsageError("--resume needs --out RUN_DIR, the folder of the run to continue")
        return
    held = (Path(out) / "run.json").is_file()
    if held and not resume:
        raise UsageError(f"--out {out} already holds a lab run; pass --resume to continue it, or choose a new --out")
    if resume and not held:
        raise UsageError(f"--resume: {out} holds no lab run (no run.json) to continue; drop --resume to start one")


def _run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from rlsparse.errors import UsageError
    from rlsparse.lab.base import BaseConfig
    from rlsparse.lab.real import is_real_base
    from rlsparse.lab.runner import LabOptions, run_lab

    _check_out(args.out, args.resume)

    names = args.recipes if args.recipes == "all" else [n for n in args.recipes.split(",") if n]
    real = args.base[0] if len(args.base) == 1 and is_real_base(args.base[0]) else None
    if real is None and names == ["real"]:
        real = "smollm2-135m"
    if real is not None:
        args.base = []
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds is not None else None
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2") from None
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise UsageError(f"--seeds {args.seeds!r}: expected distinct integers such as 0,1,2")
    grid_lrs = None
    if args.grid_lrs is not None:
        if not args.grid:
            raise UsageError("--grid-lrs chooses learning rates of a --grid run; add --grid, or drop --grid-lrs")
        try:
            grid_lrs = [float(v) for v in args.grid_lrs.split(",") if v.strip()]
        except ValueError:
            grid_lrs = []
        if not grid_lrs or any(not lr > 0 for lr in grid_lrs):
            raise UsageError(f"--grid-lrs {args.grid_lrs!r}: expected comma-separated positive learning rates "
                             "such as 5e-7,1e-6")
    out = Path(args.out) if args.out else Path("runs") / time.strftime("lab-%Y%m%d-%H%M%S")
    opts = LabOptions(out=out, model=args.model, device=args.device, dataset=args.dataset, quick=args.quick,
                      checkpoint_dtype="float32" if args.fp32_checkpoints else "bfloat16",
                      compute={"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[args.compute],
                      weights="bfloat16" if args.pure_bf16 else "float32",
                      cache_dir=args.cache_dir, conjecture=not args.no_conjecture, threads=args.threads, trace=not args.no_trace,
                      progress=args.progress, jobs=args.jobs,
                      base=BaseConfig().with_overrides(args.base), real_base=real, seeds=seeds, grid=args.grid,
                      grid_learning_rates=grid_lrs)
    run_dir = run_lab(names, opts, resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import sys

    from rlsparse.lab.report import render

    html, md = render(args.run_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"report: {html}\nmarkdown: {md}")
    return 0


def _scale(args: argparse.Namespace) -> int:
    from rlsparse.lab.verdicts.scale import render_trend

    print(f"scale trend: {render_trend(args.run_dirs, args.out)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from rlsparse.lab.recipes import load_recipe, recipe_names

    for name in recipe_names():
        r = load_recipe(name)
        print(f"{name:18s} {r.algorithm:5s} {r.description}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    _check_out(args.out, args.resume)
    from rlsparse.lab.demo import demo

    report = demo(out=args.out, device=args.device, cache_dir=args.cache_dir, model=args.model, resume=args.resume,
                  progress=args.progress, smoke=args.smoke, jobs=args.jobs)
    print(f"report: {report}")
    return 0


def _threads(value: str):
    """``--threads``: a positive integer or 'auto'."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a positive integer or 'auto'")
    return n
