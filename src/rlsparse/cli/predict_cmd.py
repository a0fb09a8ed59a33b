"""``rlsparse predict``: predict the final subnetwork from early evidence, score predictions, run
the prediction experiment. Parse, validate, one library call, print."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    """Register ``predict`` and its subcommands (called by ``rlsparse.cli.main``)."""
    p = sub.add_parser("predict", help="predict the final subnetwork early; score predictions",
                       description="Predict which elements a run will have changed at its end, from early "
                                   "checkpoints, the optimizer state at step k, a cheaper run or the number format "
                                   "alone; score a prediction against the final mask.")
    ps = p.add_subparsers(dest="predict_command", metavar="PREDICTOR")
    ps.required = True

    c = ps.add_parser("checkpoints", help="changed by step k: the mask at k, or union / vote over checkpoints",
                      description="Elements changed by step k. Give the run's checkpoints up to k (the last is k), "
                                  "or --run DIR --step K to take them from a Trainer output folder.")
    c.add_argument("base", metavar="BASE", help="the checkpoint training started from")
    c.add_argument("checkpoints", nargs="*", metavar="CKPT", help="checkpoints up to step k, in step order")
    _run_step(c)
    c.add_argument("--method", choices=("checkpoint", "union", "vote"), default="checkpoint",
                   help="checkpoint: the mask at k; union: changed in any; vote: in more than half "
                        "(default checkpoint)")
    c.add_argument("--tolerance", default="1e-5", help="|new - old| > t is changed (default 1e-5, the paper's)")
    _mask_outputs(c)
    c.set_defaults(func=run_checkpoints_cmd)

    o = ps.add_parser("optimizer", help="AdamW moments at step k: |m|/sqrt(v) or predicted drift vs bf16 spacing",
                      description="Scores from the optimizer.pt a transformers Trainer saved at step k.")
    o.add_argument("base", metavar="BASE", help="the checkpoint training started from (its bf16 spacing)")
    o.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="a checkpoint-<k> folder with optimizer.pt")
    _run_step(o)
    o.add_argument("--score", choices=("adam_drift", "adam_ratio"), default="adam_drift",
                   help="adam_drift (natural threshold: the drift crosses half the spacing) or adam_ratio")
    o.add_argument("--horizon", type=int, metavar="STEPS", help="steps to project the drift over "
                                                                "(default: max_steps from trainer_state.json)")
    _mask_outputs(o)
    o.set_defaults(func=run_optimizer_cmd)

    r = ps.add_parser("run", help="the subnetwork of a cheaper run (another algorithm, a short run, another seed)")
    r.add_argument("base", metavar="BASE", help="the checkpoint both runs started from")
    r.add_argument("other", metavar="OTHER", help="the cheaper run's final checkpoint")
    r.add_argument("--tolerance", default="1e-5", help="|new - old| > t is changed (default 1e-5)")
    _mask_outputs(r)
    r.set_defaults(func=run_run_cmd)

    q = ps.add_parser("precision", help="no training signal: the elements with the smallest bf16 spacing")
    q.add_argument("base", metavar="BASE", help="the checkpoint training starts from")
    q.add_argument("--lr", type=float, help="the run's learning rate (with --steps: the natural threshold)")
    q.add_argument("--steps", type=int, help="the run's steps")
    _mask_outputs(q)
    q.set_defaults(func=run_precision_cmd)

    s = ps.add_parser("score", help="precision, recall, F1 and overlap of a predicted mask vs the final mask",
                      description="Score PREDICTED against FINAL, with the random baseline at the same density; "
                                  "with --scores, the precision-recall curve over densities.")
    s.add_argument("predicted", metavar="PREDICTED", help="the predicted mask file")
    s.add_argument("final", metavar="FINAL", help="the run's final mask file (rlsparse diff --save-mask)")
    s.add_argument("--scores", metavar="PATH", help="the predictor's .scores.safetensors (for the curve)")
    s.add_argument("--base", metavar="CHECKPOINT", help="the base model: adds the magnitude-stratified baseline")
    s.add_argument("--json", metavar="PATH", help="write the result as versioned JSON")
    s.add_argument("--plot", metavar="PATH", help="PNG: recall and precision vs density (needs --scores)")
    s.add_argument("--quiet", action="store_true", help="no table")
    s.set_defaults(func=run_score_cmd)

    lab = ps.add_parser("lab", help="the pre-registered prediction experiment on the tiny base (resumable)")
    lab.add_argument("--out", required=True, help="run folder (a finished cell is never rerun)")
    lab.add_argument("--experiment", metavar="JSON", help="design file (default: lab/experiments/predict_tiny.json)")
    lab.add_argument("--quick", action="store_true", help="the design's quick variant (a smoke run)")
    lab.set_defaults(func=run_lab_cmd)


def _run_step(p) -> None:
    p.add_argument("--run", metavar="DIR", help="a Trainer output folder with checkpoint-<step> folders")
    p.add_argument("--step", type=int, metavar="K", help="with --run: the step k of the evidence")


def _mask_outputs(p) -> None:
    p.add_argument("--out", required=True, metavar="MASK", help="the predicted mask file to write")
    p.add_argument("--density", type=float, help="keep this fraction of elements (top scores); "
                                                 "default: the predictor's natural threshold")
    p.add_argument("--scores", metavar="PATH", help="also write the scores (for `predict score --scores`)")
    p.add_argument("--seed", type=int, default=0, help="seed for breaking ties at the cut (default 0)")


def _from_run(args, single: bool) -> list[str]:
    from rlsparse.errors import UsageError
    from rlsparse.predict import checkpoint_at, run_checkpoints

    given = [args.checkpoint] if single and args.checkpoint else list(getattr(args, "checkpoints", []) or [])
    if args.run is None:
        if args.step is not None:
            raise UsageError("--step needs --run DIR (the Trainer output folder)")
        if not given:
            raise UsageError("give the checkpoint(s), or --run DIR --step K")
        return given
    if given:
        raise UsageError("give either checkpoint paths or --run DIR --step K, not both")
    if args.step is None:
        raise UsageError("--run needs --step K (the step of the evidence)")
    last = checkpoint_at(args.run, args.step)  # one-line error when k is beyond the run
    if single:
        return [str(last)]
    return [str(p) for s, p in run_checkpoints(args.run).items() if s <= args.step]


def _tolerance(text: str) -> float:
    from rlsparse.errors import UsageError

    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--tolerance {text!r}: expected a number such as 1e-5") from None


def _write(args, prediction) -> int:
    mask = prediction.mask(density=args.density, seed=args.seed)
    mask.save(args.out)
    if args.scores:
        prediction.save(args.scores)
    print(f"{prediction.predictor}: {mask.ones:,} of {mask.numel:,} elements ({mask.density:.4%}); "
          f"{mask.meta.extra['selection']}")
    print(f"wrote mask: {args.out}" + (f"; scores: {args.scores}" if args.scores else ""))
    return 0


def _check_outputs(args) -> None:
    from rlsparse.errors import UsageError
    from rlsparse.io.atomic import check_writable

    check_writable(args.out)
    if args.scores:
        check_writable(args.scores)
    if args.density is not None and not 0.0 <= args.density <= 1.0:
        raise UsageError(f"--density {args.density}: expected a fraction in [0, 1], e.g. 0.05")


def run_checkpoints_cmd(args) -> int:
    from rlsparse.predict import from_checkpoints

    _check_outputs(args)
    cks = _from_run(args, single=False)
    return _write(args, from_checkpoints(args.base, cks, method=args.method, tolerance=_tolerance(args.tolerance)))


def run_optimizer_cmd(args) -> int:
    from rlsparse.predict import from_optimizer

    _check_outputs(args)
    ck = _from_run(args, single=True)[0]
    return _write(args, from_optimizer(args.base, ck, score=args.score, horizon=args.horizon))


def run_run_cmd(args) -> int:
    from rlsparse.predict import from_checkpoints

    _check_outputs(args)
    return _write(args, from_checkpoints(args.base, [args.other], tolerance=_tolerance(args.tolerance),
                                         predictor="run"))


def run_precision_cmd(args) -> int:
    from rlsparse.predict import from_precision

    _check_outputs(args)
    return _write(args, from_precision(args.base, lr=args.lr, steps=args.steps))


def run_score_cmd(args) -> int:
    from rlsparse.errors import UsageError
    from rlsparse.io.atomic import check_writable, write_json
    from rlsparse.predict import Prediction, score

    for path in (args.json, args.plot):
        if path:
            check_writable(path)
    if args.plot and not args.scores:
        raise UsageError("--plot draws the curve over densities, which needs the predictor's --scores file")
    prediction = Prediction.load(args.scores) if args.scores else None
    result = score(args.predicted, args.final, prediction=prediction, base=args.base)
    if args.plot:
        from rlsparse.predict.plots import pr_curves

        pr_curves({prediction.predictor: result.curve}, args.plot, final_density=result.final_ones / result.numel)
    if args.json:
        write_json(args.json, result.to_json())
    if not args.quiet:
        _print_score(result)
        for what, path in (("json", args.json), ("plot", args.plot)):
            if path:
                print(f"wrote {what}: {path}")
    return 0


def _print_score(result) -> None:
    from rich.console import Console
    from rich.table import Table

    pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
    t = Table(title=f"Predicted {result.predicted} vs final {result.final}")
    for col in ("", "density %", "precision %", "recall %", "F1 %"):
        t.add_column(col, justify="left" if not col else "right")
    n = result.numel
    t.add_row("prediction", pct(result.predicted_ones / n), pct(result.precision), pct(result.recall), pct(result.f1))
    r = result.random
    t.add_row("random (uniform)", pct(result.predicted_ones / n), pct(r["precision"]), pct(r["recall"]), pct(r["f1"]))
    if result.stratified is not None:
        s = result.stratified
        t.add_row("random (stratified)", pct(result.predicted_ones / n), pct(s["precision"]), pct(s["recall"]),
                  pct(s["f1"]))
    t.add_row("final", pct(result.final_ones / n), "", "", "")
    Console().print(t)
    if result.curve is not None:
        at = result.curve.at(result.final_ones / n)
        print(f"from the scores, at the final density: recall {pct(at['recall'])}% "
              f"(random {pct(at['random']['recall'])}%)")


def run_lab_cmd(args) -> int:
    from rlsparse.lab.predict_lab import run_predict_lab

    run_predict_lab(args.out, experiment=args.experiment, quick=args.quick,
                    log=lambda s: print(s, file=sys.stdout, flush=True))
    return 0
