"""``rlsparse overlap | series | rank | precision | spectral``: parse, validate, one library call, print."""

from __future__ import annotations

import sys

from rlsparse.cli.options import add_ray


def add_parsers(sub) -> None:
    """Register every analysis command (called by ``rlsparse.cli.main``)."""
    add_overlap_parser(sub)
    add_series_parser(sub)
    add_rank_parser(sub)
    add_precision_parser(sub)
    add_spectral_parser(sub)


def _outputs(p, plot_help: str) -> None:
    p.add_argument("--json", metavar="PATH", help="write the result as versioned JSON")
    p.add_argument("--plot", metavar="PATH", help=plot_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no tables")


def _matrix_options(p) -> None:
    p.add_argument("--device", default=None, help="torch device for the SVDs (default: cuda if available, else cpu)")
    p.add_argument("--max-matrices", type=int, metavar="N", help="analyse N matrices, evenly spaced (CPU sampling)")
    p.add_argument("--layers", metavar="LIST", help="only these transformer blocks, e.g. 0,5,10")
    p.add_argument("--include-embeddings", action="store_true", help="also embed_tokens / lm_head (large)")
    p.add_argument("--no-layers", action="store_true", help="omit the per-layer table")


def _start(args) -> bool:
    """Check output paths before long work; return whether to show progress."""
    from rlsparse.io.atomic import check_writable

    for path in (args.json, args.plot):
        if path:
            check_writable(path)
    return not args.quiet and sys.stderr.isatty()


def _finish(args, result, plot) -> None:
    from rlsparse.io.atomic import write_json

    if args.plot:
        plot(result, args.plot)
    if args.json:
        write_json(args.json, result.to_json())


def _wrote(console, args) -> None:
    for what, path in (("json", args.json), ("plot", args.plot)):
        if path:
            console.print(f"wrote {what}: {path}")


def _parse_layers(text: str | None) -> list[int] | None:
    from rlsparse.errors import UsageError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--layers {text!r}: expected comma-separated block indices, e.g. 0,5,10") from None


# overlap ------------------------------------------------------------------------------------------
def add_overlap_parser(sub) -> None:
    p = sub.add_parser(
        "overlap", help="how much subnetworks share (o1, o2, Jaccard vs random guessing)",
        description="Pairwise overlap of subnetwork masks (paper section 5, Table 4, Appendix E), in total, "
                    "per layer and per matrix type. Give two or more mask files, or --from-checkpoints.")
    p.add_argument("masks", nargs="*", metavar="MASK", help="mask files written by `rlsparse diff --save-mask`")
    p.add_argument("--from-checkpoints", nargs="+", metavar="BASE FT",
                   help="compare two or more runs straight from their checkpoints, given as pairs "
                        "BASE_A FT_A BASE_B FT_B ... (no masks written)")
    p.add_argument("--tolerance", default=None, help="with --from-checkpoints: |new-old| > t is changed "
                                                     "(default: 1e-5, the paper's)")
    p.add_argument("--labels", metavar="LIST", help="comma-separated names for the inputs")
    add_ray(p)
    p.add_argument("--no-layers", action="store_true", help="omit the per-layer tables")
    _outputs(p, "PNG: per-type o1/o2 vs random (2 inputs) or the overlap matrix (3+)")
    p.set_defaults(func=run_overlap)


def run_overlap(args) -> int:
    from rich.console import Console

    from rlsparse.analysis.overlap import overlap, overlap_from_checkpoints
    from rlsparse.analysis.plots import overlap_plot
    from rlsparse.analysis.tables import overlap_tables
    from rlsparse.errors import UsageError

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if args.from_checkpoints and args.masks:
        raise UsageError("give either mask files or --from-checkpoints, not both")
    if args.from_checkpoints and (len(args.from_checkpoints) < 4 or len(args.from_checkpoints) % 2):
        raise UsageError(f"--from-checkpoints: got {len(args.from_checkpoints)} paths; give pairs BASE FT for two "
                         "or more runs (4, 6, 8... paths)")
    if args.ray is not None and not args.from_checkpoints:
        raise UsageError("--ray applies to --from-checkpoints; overlaps of mask files are computed here")
    if args.tolerance is not None and not args.from_checkpoints:
        raise UsageError("--tolerance applies to --from-checkpoints; a mask's tolerance was fixed when it was saved")
    if not args.from_checkpoints and len(args.masks) < 2:
        raise UsageError(f"overlap needs at least two mask files (got {len(args.masks)}) or "
                         "--from-checkpoints BASE_A FT_A BASE_B FT_B")
    progress = _start(args)
    if args.from_checkpoints:
        tolerance = "1e-5" if args.tolerance is None else args.tolerance
        result = overlap_from_checkpoints(*args.from_checkpoints, tolerance=tolerance, labels=labels,
                                          progress=progress, ray=args.ray)
    else:
        result = overlap(args.masks, labels=labels, progress=progress)
    _finish(args, result, overlap_plot)
    if not args.quiet:
        console = Console()
        overlap_tables(result, console, per_layer=not args.no_layers)
        _wrote(console, args)
    return 0


# series -------------------------------------------------------------------------------------------
def add_series_parser(sub) -> None:
    p = sub.add_parser(
        "series", help="sparsity along a training run (never updated / cancelled / final)",
        description="Sparsity of every checkpoint against the base and between consecutive checkpoints, the "
                    "updates outside the final subnetwork, and the never-updated / cancelled / final split "
                    "(paper Figures 2, 5, 6, 7). A folder of checkpoint-* folders is expanded in step order.")
    p.add_argument("base", help="the checkpoint the run started from")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints in training order, or a run folder")
    p.add_argument("--tolerance", default="1e-5", help="|new-old| > t is changed (default: %(default)s)")
    add_ray(p)
    _outputs(p, "PNG: the four panels (sparsity, consecutive, outside final, three-way split)")
    p.set_defaults(func=run_series)


def run_series(args) -> int:
    from rich.console import Console

    from rlsparse.analysis.plots import series_plot
    from rlsparse.analysis.series import series
    from rlsparse.analysis.tables import series_tables

    progress = _start(args)
    result = series(args.base, args.checkpoints, tolerance=args.tolerance, progress=progress, ray=args.ray)
    _finish(args, result, series_plot)
    if not args.quiet:
        console = Console()
        series_tables(result, console)
        _wrote(console, args)
    return 0


# rank ---------------------------------------------------------------------------------------------
def add_rank_parser(sub) -> None:
    p = sub.add_parser(
        "rank", help="rank of the update matrices (sparse but full rank?)",
        description="Numerical rank (% of max), stable rank and effective rank of every 2-D update matrix "
                    "(paper Table 2), in float32, mean over matrices, per type and per layer.")
    p.add_argument("base")
    p.add_argument("finetuned")
    p.add_argument("--rtol", type=float, default=None,
                   help="singular values > rtol * s_max count (default: max(m,n) * float32 eps, torch's default)")
    _matrix_options(p)
    _outputs(p, "PNG: rank and effective rank per matrix type")
    p.set_defaults(func=run_rank)


def run_rank(args) -> int:
    from rich.console import Console

    from rlsparse.analysis.plots import rank_plot
    from rlsparse.analysis.rank import rank
    from rlsparse.analysis.tables import rank_tables

    progress = _start(args)
    result = rank(args.base, args.finetuned, device=args.device, rtol=args.rtol,
                  include_embeddings=args.include_embeddings, layers=_parse_layers(args.layers),
                  max_matrices=args.max_matrices, progress=progress)
    _finish(args, result, rank_plot)
    if not args.quiet:
        console = Console()
        rank_tables(result, console, per_layer=not args.no_layers)
        _wrote(console, args)
    return 0


# precision ----------------------------------------------------------------------------------------
def add_precision_parser(sub) -> None:
    p = sub.add_parser(
        "precision", help="update sizes in ULPs, and where the tolerance is below the dtype's grid",
        description="Per tensor and in total: changed elements by distance in units in the last place (1, 2, 3+) "
                    "of the stored dtype, and the share of elements whose grid spacing exceeds each tolerance.")
    p.add_argument("base")
    p.add_argument("finetuned")
    p.add_argument("--tolerances", default="1e-8,1e-7,1e-6,1e-5,1e-4",
                   help="comma-separated tolerances to compare with the spacing (default: %(default)s)")
    p.add_argument("--per-tensor", action="store_true", help="also a row per tensor in the table")
    _outputs(p, "PNG: ULP histogram and spacing-above-tolerance curve")
    p.set_defaults(func=run_precision)


def run_precision(args) -> int:
    from rich.console import Console

    from rlsparse.analysis.plots import precision_plot
    from rlsparse.analysis.precision import precision
    from rlsparse.analysis.tables import precision_tables
    from rlsparse.errors import UsageError

    tolerances = [t.strip() for t in args.tolerances.split(",") if t.strip()]
    if not tolerances:
        raise UsageError("--tolerances is empty; use e.g. 1e-6,1e-5")
    progress = _start(args)
    result = precision(args.base, args.finetuned, tolerances=tolerances, progress=progress)
    _finish(args, result, precision_plot)
    if not args.quiet:
        console = Console()
        precision_tables(result, console, per_tensor=args.per_tensor)
        _wrote(console, args)
    return 0


# spectral -----------------------------------------------------------------------------------------
def add_spectral_parser(sub) -> None:
    p = sub.add_parser(
        "spectral", help="rotation of top-k singular subspaces, singular value change, energy outside",
        description="Per 2-D matrix: principal angles between base and finetuned top-k singular subspaces, "
                    "relative change of the top-k singular values, and the share of the update's energy "
                    "outside the base's top-k block.")
    p.add_argument("base")
    p.add_argument("finetuned")
    p.add_argument("--top-k", type=int, default=16, help="leading singular directions (default: %(default)s)")
    _matrix_options(p)
    _outputs(p, "PNG: angles and energy outside per matrix type")
    p.set_defaults(func=run_spectral)


def run_spectral(args) -> int:
    from rich.console import Console

    from rlsparse.analysis.plots import spectral_plot
    from rlsparse.analysis.spectral import spectral
    from rlsparse.analysis.tables import spectral_tables

    progress = _start(args)
    result = spectral(args.base, args.finetuned, top_k=args.top_k, device=args.device,
                      include_embeddings=args.include_embeddings, layers=_parse_layers(args.layers),
                      max_matrices=args.max_matrices, progress=progress)
    _finish(args, result, spectral_plot)
    if not args.quiet:
        console = Console()
        spectral_tables(result, console, per_layer=not args.no_layers)
        _wrote(console, args)
    return 0
