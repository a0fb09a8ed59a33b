"""Human tables for the terminal (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def diff_tables(result, console: Console, *, per_layer: bool = True) -> None:
    """Print the model totals, the tolerance sweep (like the paper's Table 6), per-type and per-layer."""
    total = result.total
    head = Table(title=f"rlsparse diff: {result.base} -> {result.finetuned}", show_header=False, box=None)
    head.add_row("tensors compared", f"{len(result.tensors):,}")
    head.add_row("parameters compared", f"{total.numel:,}")
    if total.bit_changed is not None:
        head.add_row("bit-exact changed", f"{total.bit_changed:,} ({_pct(total.bit_changed / max(total.numel, 1))}%)")
    head.add_row("read", f"{result.bytes_read / 1e9:.3f} GB in {result.elapsed_s:.2f} s "
                         f"({result.bytes_read / 1e9 / max(result.elapsed_s, 1e-9):.2f} GB/s)")
    console.print(head)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")

    sweep = Table(title="Update sparsity by tolerance (paper: Table 6; headline at 1e-05)")
    sweep.add_column("tolerance", justify="right")
    sweep.add_column("changed", justify="right")
    sweep.add_column("sparsity %", justify="right")
    sweep.add_column("density %", justify="right")
    for lab in result.labels:
        sweep.add_row(lab, f"{total.changed[lab]:,}", _pct(total.sparsity(lab)), _pct(total.density(lab)))
    console.print(sweep)

    labs = result.labels
    console.print(_sparsity_by("Sparsity % by matrix type", "type", result.by_type().items(), labs))
    if per_layer:
        rows = (("other" if layer is None else str(layer), agg) for layer, agg in result.by_layer().items())
        console.print(_sparsity_by("Sparsity % by layer", "layer", rows, labs))


def _sparsity_by(title: str, key: str, rows, labels: list[str]) -> Table:
    table = Table(title=title)
    table.add_column(key)
    table.add_column("params", justify="right")
    for lab in labels:
        table.add_column(f"t={lab}", justify="right")
    for name, agg in rows:
        table.add_row(name, f"{agg.numel:,}", *[_pct(agg.sparsity(lab)) for lab in labels])
    return table
