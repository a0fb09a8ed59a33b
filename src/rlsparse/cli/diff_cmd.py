"""``rlsparse diff BASE FINETUNED``."""

from __future__ import annotations

import argparse
import sys

from rlsparse.cli.options import add_ray


def add_parser(sub) -> None:
    p = sub.add_parser(
        "diff", help="which parameters finetuning changed (streaming, bounded memory)",
        description="Count the elements that changed between two checkpoints at several tolerances, "
                    "per tensor, layer and matrix type; optionally save the subnetwork mask.")
    p.add_argument("base", help="checkpoint before finetuning: HF folder, .safetensors/.bin file or hub id")
    p.add_argument("finetuned", help="checkpoint after finetuning")
    p.add_argument("--tolerances", default=None,
                   help="comma-separated; |new-old| > t counts as changed (default: 0,1e-08,1e-07,1e-06,1e-05)")
    p.add_argument("--json", metavar="PATH", help="write the full result as versioned JSON")
    p.add_argument("--plot", metavar="PATH", help="write the layer x matrix-type sparsity heatmap (PNG)")
    p.add_argument("--plot-tolerance", default=None, help="tolerance for --plot (default: --mask-tolerance)")
    p.add_argument("--save-mask", metavar="PATH", help="write the subnetwork mask (rlsparse mask format)")
    p.add_argument("--mask-tolerance", default="1e-5", help="tolerance defining the mask (default: %(default)s)")
    p.add_argument("--allow-missing", action="store_true", help="compare the common tensors when the sets differ")
    p.add_argument("--allow-resize", action="store_true",
                   help="compare the common leading rows when dim 0 differs (resized vocabulary)")
    p.add_argument("--compare-dtype", metavar="DTYPE", help="cast both sides to DTYPE (bf16, fp16, fp32) first")
    p.add_argument("--no-layers", action="store_true", help="omit the per-layer table")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no tables")
    p.add_argument("--chunk-elements", type=int, default=None, help=argparse.SUPPRESS)
    add_ray(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    import rlsparse
    from rlsparse.errors import UsageError
    from rlsparse.io.atomic import check_writable, write_json

    from rlsparse.diff import DEFAULT_TOLERANCES

    tolerances = DEFAULT_TOLERANCES if args.tolerances is None else [t for t in args.tolerances.split(",") if t.strip()]
    for path in (args.json, args.plot):
        if path:
            check_writable(path)
    if args.chunk_elements is not None and args.chunk_elements < 8:
        raise UsageError("--chunk-elements must be at least 8")
    result = rlsparse.diff(
        args.base, args.finetuned, tolerances=tolerances, mask_path=args.save_mask,
        mask_tolerance=args.mask_tolerance, allow_missing=args.allow_missing, allow_resize=args.allow_resize,
        compare_dtype=args.compare_dtype, progress=not args.quiet and sys.stderr.isatty(),
        chunk_elements=args.chunk_elements, ray=args.ray)
    if args.plot:
        from rlsparse.diff.result import tolerance_label
        from rlsparse.report.plots import sparsity_heatmap

        label = tolerance_label(args.plot_tolerance or args.mask_tolerance)
        if label not in result.labels:
            label = _label_for(result, float(label))
        sparsity_heatmap(result, args.plot, label)
    if args.json:
        write_json(args.json, result.to_json())
    if not args.quiet:
        from rlsparse.report.tables import diff_tables

        console = Console()
        diff_tables(result, console, per_layer=not args.no_layers)
        for what, path in (("mask", args.save_mask), ("json", args.json), ("plot", args.plot)):
            if path:
                console.print(f"wrote {what}: {path}")
    return 0


def _label_for(result, value: float) -> str:
    from rlsparse.errors import UsageError

    for lab, t in zip(result.labels, result.tolerances):
        if t == value:
            return lab
    raise UsageError(f"--plot-tolerance {value} is not among --tolerances {','.join(result.labels)}; add it there")
