"""Terminal tables (rich) for the analyses."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _overlap_rows(table: Table, groups: dict) -> None:
    for key, s in groups.items():
        table.add_row(str(key), f"{s.numel:,}", _pct(s.sparsity_a), _pct(s.sparsity_b), _pct(s.o1), _pct(s.o1_random),
                      _pct(s.o2), _pct(s.o2_random), _pct(s.jaccard))


def _overlap_table(title: str, first: str) -> Table:
    t = Table(title=title)
    for col in (first, "params", "sp a %", "sp b %", "o1 %", "o1 rnd %", "o2 %", "o2 rnd %", "jacc %"):
        t.add_column(col, justify="left" if col == first else "right")
    return t


def overlap_tables(result, console: Console, *, per_layer: bool = True) -> None:
    """Pairs (Table 4 layout), per-type and per-layer breakdowns, and the k x k matrix for k > 2."""
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    pairs = result.pairs
    console.print("o1: share of a's subnetwork inside b's; o2: the reverse; rnd: random-guessing baseline "
                  "(Appendix E); sp: sparsity")
    t = _overlap_table("Subnetwork overlap", "a | b")
    for p in pairs:
        _overlap_rows(t, {f"{p.a} | {p.b}": p.total})
    console.print(t)
    for p in pairs:
        bt = _overlap_table(f"By matrix type: {p.a} | {p.b}", "type")
        _overlap_rows(bt, p.by_type)
        console.print(bt)
        if per_layer:
            bl = _overlap_table(f"By layer: {p.a} | {p.b}", "layer")
            _overlap_rows(bl, p.by_layer)
            console.print(bl)
    if len(result.labels) > 2:
        m = result.matrix()
        mt = Table(title="% of row's subnetwork covered by column's")
        mt.add_column("")
        for lab in result.labels:
            mt.add_column(lab, justify="right")
        for i, lab in enumerate(result.labels):
            mt.add_row(lab, *["-" if x != x else f"{100 * x:.1f}" for x in m[i]])
        console.print(mt)


def series_tables(result, console: Console) -> None:
    t = Table(title=f"Sparsity along the run (tolerance {result.tolerance:g}, {result.numel:,} parameters)")
    for col in ("checkpoint", "step", "sparsity vs base %", "vs previous %", "outside final %"):
        t.add_column(col, justify="left" if col == "checkpoint" else "right")
    cons = [None] + result.consecutive_sparsity
    for k, path in enumerate(result.checkpoints):
        t.add_row(path, "-" if result.steps[k] is None else str(result.steps[k]), _pct(result.sparsity[k]),
                  _pct(cons[k]), _pct(result.outside_final_fraction[k]))
    console.print(t)
    s = Table(title="Every parameter over the whole run (Figure 2)", show_header=False)
    s.add_row("never updated", f"{_pct(result.never_updated)} %")
    s.add_row("updated, cancelled out by the end", f"{_pct(result.cancelled)} %")
    s.add_row("final subnetwork", f"{_pct(result.final_subnetwork)} %")
    s.add_row("ever updated but outside the final", f"{_pct(result.ever_updated_outside_final)} % of ever updated")
    console.print(s)
    if result.tensor_counts:
        g = Table(title="By matrix type over the run")
        for col in ("type", "params", "final sparsity %", "never updated %", "cancelled %", "final subnetwork %"):
            g.add_column(col, justify="left" if col == "type" else "right")
        for typ, d in result.by_type().items():
            g.add_row(typ, f"{d['numel']:,}", _pct(d["sparsity"][-1]), _pct(d["never_updated"]), _pct(d["cancelled"]),
                      _pct(d["final_subnetwork"]))
        console.print(g)


def _summary_table(title: str, first: str, groups: dict, cols: list[tuple[str, str, str]]) -> Table:
    t = Table(title=title)
    t.add_column(first)
    t.add_column("matrices", justify="right")
    for _, head, _ in cols:
        t.add_column(head, justify="right")
    for key, g in groups.items():
        t.add_row(str(key), str(g["matrices"]), *[_num(g[k], f) for k, _, f in cols])
    return t


_RANK_COLS = [("rank_pct", "rank % of max", ".2f"), ("stable_rank", "stable rank", ".2f"),
              ("effective_rank", "effective rank", ".1f"), ("effective_rank_pct", "eff. rank % of max", ".2f")]


def rank_tables(result, console: Console, *, per_layer: bool = True) -> None:
    tol = "max(m,n)*eps (torch default)" if result.rtol is None else f"{result.rtol:g}"
    console.print(f"rank: singular values > rtol * s_max with rtol = {tol}; device {result.device}; "
                  f"{len(result.matrices)} matrices in {result.elapsed_s:.1f} s")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(_summary_table("Update rank, mean over matrices (Table 2)", "",
                                 {"all": result._summary(result.matrices)}, _RANK_COLS))
    console.print(_summary_table("By matrix type", "type", result.by_type(), _RANK_COLS))
    if per_layer:
        console.print(_summary_table("By layer", "layer", result.by_layer(), _RANK_COLS))


_SPECTRAL_COLS = [("left_angle_max", "left max °", ".2f"), ("left_angle_mean", "left mean °", ".2f"),
                  ("right_angle_max", "right max °", ".2f"), ("right_angle_mean", "right mean °", ".2f"),
                  ("sv_rel_change_max_abs", "max |Δs/s|", ".2e"), ("energy_outside", "energy outside", ".3f")]


def spectral_tables(result, console: Console, *, per_layer: bool = True) -> None:
    console.print(f"spectral: top {result.top_k} singular directions; device {result.device}; "
                  f"{len(result.matrices)} matrices in {result.elapsed_s:.1f} s")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(_summary_table("Spectral change, mean over matrices", "", {"all": result._summary(result.matrices)},
                                 _SPECTRAL_COLS))
    console.print(_summary_table("By matrix type", "type", result.by_type(), _SPECTRAL_COLS))
    if per_layer:
        console.print(_summary_table("By layer", "layer", result.by_layer(), _SPECTRAL_COLS))


def precision_tables(result, console: Console, *, per_tensor: bool = False) -> None:
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    groups = {"all": result.total, **result.by_type()}
    if per_tensor:
        groups.update(result.tensors)
    t = Table(title="Changed elements by distance in units in the last place of the stored dtype")
    for c in ("", "params", "changed", "1 ULP %", "2 ULP %", "3+ ULP %", "non-finite"):
        t.add_column(c, justify="left" if not c else "right")
    for key, s in groups.items():
        c = s.changed
        t.add_row(str(key), f"{s.numel:,}", f"{c:,}", _pct(s.ulp1 / c if c else None), _pct(s.ulp2 / c if c else None),
                  _pct(s.ulp3_plus / c if c else None), f"{s.nonfinite_changed:,}")
    console.print(t)
    sp = Table(title="% of elements whose grid spacing exceeds the tolerance (there it cannot matter)")
    sp.add_column("")
    for lab in result.labels:
        sp.add_column(f"> {lab}", justify="right")
    for key, s in groups.items():
        sp.add_row(str(key), *[_pct(s.spacing_above[lab] / s.numel if s.numel else None) for lab in result.labels])
    console.print(sp)
