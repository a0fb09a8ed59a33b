"""Table 4 from a run's finished cells: which pairs of subnetworks to compare, and their overlaps.

Nothing here trains. The rows come from what the run already holds:

- seed: a recipe run with two or more seeds has its ``seed_overlap`` rows for its first two seeds
  (``runner``), and here its further pairs of seeds (0/2 and 1/2 for seeds 0, 1, 2); a recipe run
  with one seed and a Conjecture 1 result is paired here with that result's reseeded full run
  (same recipe, start, data recipe and learning rate; seed + 1);
- data and algorithm: the pairs the run's suite declares (``Suite.table4_pairs``: two recipes and
  the factor that differs), at every learning rate both ran, once per seed both ran (the first
  seed of each if they share none).

A pair whose recipe is not in the run (a partial run of a suite) or whose checkpoint is gone
becomes a "not measured" row saying which: a suite's pairs name all of its recipes, and a run of a
few of them must still report. A pair naming a recipe the suite does not have is refused when the
suite loads (``recipes.Suite``): that is a mistake in the declaration, not a partial run.

Each subnetwork (changed at 1e-5 against the pair's common start) is a mask written by
``lab.measure.subnetwork_mask``; ``analysis.overlap`` with the start as ``base`` counts o1, o2,
Jaccard, the Appendix E uniform null and the magnitude-stratified null. The masks of all rows with
one start go into one ``overlap`` call. Rows land in ``RUN_DIR/table4.json``, keyed by the
checkpoints' sha256, so a later report recomputes only a row whose checkpoints changed.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from rlsparse.io.atomic import write_json
from rlsparse.lab import measure
from rlsparse.lab.recipes import load_suite
from rlsparse.lab.trained import checkpoint_sha256

SCHEMA_VERSION = 1
CACHE = "table4.json"
_VALUES = ("o1", "o2", "jaccard", "o1_random", "o2_random", "o1_stratified", "o2_stratified", "sparsity_a",
           "sparsity_b", "changed_a", "changed_b", "intersection", "intersection_stratified", "numel")


def declared_pairs(run_meta: dict) -> tuple[list[dict], str]:
    """The run's Table 4 pairs and a sentence on when they were declared.

    A run records its suite's pairs in ``run.json`` when it starts; for a run started before that
    field existed, the current suite file of its base is used, and the sentence says so.
    """
    if "table4_pairs" in run_meta:
        pairs = list(run_meta["table4_pairs"] or [])
        return pairs, (run_meta.get("table4_declared") or "recorded in run.json") if pairs else ""
    if run_meta.get("real_base"):
        suite = load_suite("real")
        if suite.base == run_meta["real_base"]:
            return list(suite.table4_pairs), (f"{suite.table4_declared} Not in this run's run.json (the run predates "
                                              "the field): taken from the suite file of this rlsparse.")
    return [], ""


def planned_rows(results: dict, pairs: list[dict]) -> list[dict]:
    """The rows to measure (checkpoints and their common start), or "not measured" rows with the reason."""
    rows = []
    for name, conj in (results.get("conjecture") or {}).items():
        entry = results["recipes"].get(name)
        if entry is None or not conj.get("reseeded_checkpoint") or not conj.get("full_checkpoint"):
            continue
        if len({p.get("seed", conj.get("seed")) for p in entry["points"]}) > 1:
            continue  # the recipe ran several seeds: its seed_overlap rows are the seed rows
        full = next((p for p in entry["points"] if p.get("checkpoint") == conj["full_checkpoint"]), {})
        seed = int(conj.get("seed", 0))
        rows.append({"factor": "seed", "a": name, "b": name, "source": "Conjecture 1 reseeded full run",
                     "why": "the same recipe, start, learning rate and steps; seed + 1 (the seed also draws the "
                            "policy samples of recipes trained on them)",
                     "learning_rate": conj["learning_rate"], "seeds": [seed, seed + 1],
                     "a_checkpoint": conj["full_checkpoint"], "b_checkpoint": conj["reseeded_checkpoint"],
                     "start": full.get("start", "base")})
    rows += _other_seed_pairs(results)
    for pair in pairs:
        a, b = pair["a"], pair["b"]
        row = {"factor": pair["factor"], "a": a, "b": b, "source": "declared pair", "why": pair.get("why", "")}
        missing = [n for n in (a, b) if n not in results["recipes"]]
        if missing:
            rows.append({**row, "not_measured": f"recipe{'s' if len(missing) > 1 else ''} {' and '.join(missing)} "
                                                "did not run in this run"})
            continue
        for pa, pb in _seed_matched(results["recipes"][a]["points"], results["recipes"][b]["points"]):
            common = sorted(set(pa) & set(pb))
            if not common:
                rows.append({**row, "not_measured": f"no learning rate in common ({sorted(pa)} vs {sorted(pb)})"})
            for lr in common:
                one = {**row, "learning_rate": lr, "seeds": [pa[lr].get("seed"), pb[lr].get("seed")],
                       "a_checkpoint": pa[lr]["checkpoint"], "b_checkpoint": pb[lr]["checkpoint"],
                       "start": pa[lr].get("start", "base")}
                if pb[lr].get("start", "base") != one["start"]:
                    one["not_measured"] = (f"the two cells start from different models ({one['start']} vs "
                                           f"{pb[lr].get('start', 'base')}): no common base to diff against")
                rows.append(one)
    return rows


def _other_seed_pairs(results: dict) -> list[dict]:
    """Seed rows of a sweep beyond its first two seeds (the runner's ``seed_overlap`` has those):
    with seeds 0, 1, 2, the pairs 0/2 and 1/2 at every learning rate."""
    from itertools import combinations

    rows = []
    for name, entry in results["recipes"].items():
        seeds = list(dict.fromkeys(p.get("seed") for p in entry["points"]))
        for sa, sb in list(combinations(seeds, 2))[1:]:
            pa = {p["learning_rate"]: p for p in entry["points"] if p.get("seed") == sa}
            pb = {p["learning_rate"]: p for p in entry["points"] if p.get("seed") == sb}
            for lr in sorted(set(pa) & set(pb)):
                if pa[lr].get("start", "base") != "base" or pb[lr].get("start", "base") != "base":
                    continue  # a start per seed (pre-SFT): the runner skips these too
                rows.append({"factor": "seed", "a": name, "b": name, "source": "seed sweep (further seeds)",
                             "why": "the same recipe and learning rate, another pair of seeds",
                             "learning_rate": lr, "seeds": [sa, sb], "a_checkpoint": pa[lr]["checkpoint"],
                             "b_checkpoint": pb[lr]["checkpoint"], "start": "base"})
    return rows


def _seed_matched(points_a: list[dict], points_b: list[dict]) -> list[tuple[dict, dict]]:
    """The two recipes' cells by learning rate, once per seed both ran (in the first recipe's seed
    order), so a declared pair run with seeds 0, 1, 2 gives three rows per learning rate; two
    recipes with no seed in common are paired on their first seeds."""
    def by_lr(points, seed):
        return {p["learning_rate"]: p for p in points if p.get("seed") == seed}

    seeds_a = list(dict.fromkeys(p.get("seed") for p in points_a))
    seeds_b = list(dict.fromkeys(p.get("seed") for p in points_b))
    shared = [s for s in seeds_a if s in seeds_b]
    if not shared:
        return [(by_lr(points_a, seeds_a[0] if seeds_a else None), by_lr(points_b, seeds_b[0] if seeds_b else None))]
    return [(by_lr(points_a, s), by_lr(points_b, s)) for s in shared]


def table4_rows(run_dir: str | Path, results: dict, log=None) -> dict:
    """Measure (or read back) the run's Table 4 rows and cache them in ``RUN_DIR/table4.json``.

    Args:
        run_dir: A lab run folder (its checkpoints are read, never written).
        results: Its ``results.json`` content.
        log: Progress printer (None: quiet).

    Returns:
        ``{"schema_version", "tolerance", "declared", "rows": [...]}``: each row names the factor,
        the two recipes, learning rate, seeds and checkpoints and holds o1, o2, Jaccard, both
        nulls and both sparsities, or ``not_measured`` with the reason.

    Example:
        >>> doc = table4_rows("runs/rq3", json.load(open("runs/rq3/results.json")))
        >>> [(r["factor"], r["a"], r["b"], r.get("o1")) for r in doc["rows"]]
    """
    run_dir = Path(run_dir)
    pairs, declared = declared_pairs(results["run"])
    rows = planned_rows(results, pairs)
    tol = measure.PAPER_TOLERANCE
    if not rows:
        return {"schema_version": SCHEMA_VERSION, "tolerance": tol, "declared": declared, "rows": []}
    cache_path = run_dir / CACHE
    cached = _cached_rows(cache_path)
    hashes: dict[str, str | None] = {}

    def sha(rel: str) -> str | None:
        if rel not in hashes:
            hashes[rel] = checkpoint_sha256(_path(run_dir, results, rel))
        return hashes[rel]

    todo = []
    for row in rows:
        if "not_measured" in row:
            continue
        gone = [row[k] for k in ("a_checkpoint", "b_checkpoint") if sha(row[k]) is None]
        if gone or sha(row["start"]) is None:
            row["not_measured"] = f"checkpoint {', '.join(gone or [row['start']])} is not in the run folder"
            continue
        row.update(a_sha256=sha(row["a_checkpoint"]), b_sha256=sha(row["b_checkpoint"]),
                   start_sha256=sha(row["start"]), tolerance=tol)
        old = next((c for c in cached if all(c.get(k) == row[k] for k in _KEY)), None)
        if old is not None:
            row.update({k: old.get(k) for k in _VALUES})
        else:
            todo.append(row)
    by_start: dict[str, list[dict]] = {}
    for row in todo:
        by_start.setdefault(row["start"], []).append(row)
    for start, group in by_start.items():
        _measure(run_dir, results, start, group, tol, log)
    doc = {"schema_version": SCHEMA_VERSION, "tolerance": tol, "declared": declared, "rows": rows}
    if todo or not cache_path.is_file():
        write_json(cache_path, doc, indent=1, allow_nan=True, default=float)
    return doc


def _cached_rows(path: Path) -> list[dict]:
    """The rows of an earlier ``table4.json``; none if it is absent, unreadable or of another schema
    (it is a cache: measuring again gives the same rows)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return doc.get("rows", []) if isinstance(doc, dict) and doc.get("schema_version") == SCHEMA_VERSION else []


# What makes a cached row this row: the same cells, the same weights, the same start, the same tolerance.
_KEY = ("a_checkpoint", "b_checkpoint", "start", "a_sha256", "b_sha256", "start_sha256", "tolerance")


def _path(run_dir: Path, results: dict, rel: str) -> Path:
    if rel == "base":
        link = run_dir / "base"
        return link if link.exists() else Path(results["run"]["base"])
    return run_dir / rel


def _measure(run_dir: Path, results: dict, start: str, rows: list[dict], tol: str, log) -> None:
    """One ``overlap`` call over the masks of every checkpoint these rows name (all against ``start``)."""
    names = list(dict.fromkeys(r[k] for r in rows for k in ("a_checkpoint", "b_checkpoint")))
    index = {n: i for i, n in enumerate(names)}
    pairs = [(index[r["a_checkpoint"]], index[r["b_checkpoint"]]) for r in rows]
    measured = subnetwork_overlaps(_path(run_dir, results, start), [run_dir / n for n in names], pairs, tol,
                                   labels=names, log=log, what=f"against {start}")
    for row, values in zip(rows, measured):
        row.update(values)


def subnetwork_overlaps(start: str | Path, checkpoints: list[Path], pairs: list[tuple[int, int]],
                        tolerance: str = measure.PAPER_TOLERANCE, labels: list[str] | None = None, log=None,
                        what: str = "") -> list[dict]:
    """Table 4's numbers for pairs of finetunes of one start: each checkpoint's subnetwork (changed at
    ``tolerance`` against ``start``, a mask by ``measure.subnetwork_mask``), then one
    ``analysis.overlap`` call over all of them with ``start`` as the base of the stratified null.

    The one place the lab measures overlaps: Table 4's rows here and the runner's ``seed_overlap``
    (a recipe's first two seeds) both come from it.

    Args:
        start: The checkpoint every one of ``checkpoints`` was finetuned from.
        checkpoints: The finetuned checkpoints.
        pairs: (a, b) indices into ``checkpoints``.
        tolerance: The subnetwork's tolerance.
        labels: Names of the checkpoints in progress lines (default: their paths).
        log: Progress printer (None: quiet).
        what: Said after each subnetwork in progress lines ("against base").

    Returns:
        Per pair: o1, o2, Jaccard, the Appendix E uniform null (``o1_random``, ``o2_random``), the
        magnitude-stratified null (``o1_stratified``, ``o2_stratified``, ``intersection_stratified``),
        both sparsities and counts, as ``rlsparse overlap --base`` gives them.

    Example:
        >>> subnetwork_overlaps("runs/demo/base", [Path("runs/demo/runs/grpo/lr-1e-5"),
        ...                     Path("runs/demo/conjecture/grpo/reseeded")], [(0, 1)])[0]["o1"]
    """
    from rlsparse.analysis.nulls import add_stratified
    from rlsparse.analysis.overlap import overlap

    labels = list(labels) if labels is not None else [str(c) for c in checkpoints]
    with tempfile.TemporaryDirectory(prefix="rlsparse-overlap-") as tmp:
        masks, begun = [], time.time()
        for i, folder in enumerate(checkpoints):
            masks.append(measure.subnetwork_mask(start, folder, Path(tmp) / f"{i}.mask.safetensors", tolerance))
            if log:
                spent = time.time() - begun
                log(f"table 4: subnetwork {i + 1}/{len(checkpoints)} ({labels[i]}, changed at {tolerance} {what}); "
                    f"{spent:.0f}s, ETA {spent / (i + 1) * (len(checkpoints) - i - 1):.0f}s")
        if log:
            log(f"table 4: overlaps of {len(pairs)} pairs with the uniform and magnitude-stratified nulls")
        result = overlap(masks, labels, base=start)
    out = []
    for i, j in pairs:
        doc = {"definitions": {}, "pairs": [{"a": labels[i], "b": labels[j], **result.pair(i, j).total.to_json()}]}
        add_stratified(doc, labels, result.stratified)  # the stratified o1/o2 as `rlsparse overlap --base` gives them
        out.append({k: doc["pairs"][0].get(k) for k in _VALUES})
    return out
