"""Human tables for the terminal (rich), legible at 80 columns and when piped.

Numbers are never cut: a numeric (right-justified) column is at least as wide as its widest
value, its header wraps instead; labels wrap (folding long paths); a table wider than the
terminal is printed whole rather than cropped. Path labels lose the folders they all share.
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table

_LABEL_MIN_WIDTH = 12  # below this, the outer borders go
_LABEL_WIDTH = 24  # labels up to this long stay on one line; numeric headers wrap first


def fit(table: Table, width: int = 80) -> Table:
    """Set column widths for a ``width``-column terminal so that numbers are whole and labels wrap.

    Numeric (right-justified) columns get a fixed width: their widest value or header word. Label
    columns share what is left (folding long paths), down to a few characters; the outer borders
    go first when even that does not fit. A table that still does not fit is printed uncropped.
    """
    numeric = [c for c in table.columns if c.justify == "right"]
    labels = [c for c in table.columns if c.justify != "right"]
    def overhead() -> int:
        inner = len(table.columns) - 1 if table.box else 0
        return 2 * len(table.columns) + inner + (2 if table.show_edge and table.box else 0)

    widest = {id(c): max([len(str(x)) for x in c.cells] + [len(str(c.header))]) for c in labels}
    wanted = sum(min(widest[id(c)], _LABEL_MIN_WIDTH) for c in labels)
    for col in numeric:
        col.no_wrap = False
        col.overflow = "fold"
        col.width = max([len(str(c)) for c in col.cells] + [len(str(col.header))])
    if width - sum(c.width for c in numeric) - overhead() < sum(min(widest[id(c)], _LABEL_WIDTH) for c in labels):
        for col in numeric:  # headers wrap at their spaces; numbers keep their full width
            col.width = max([len(str(c)) for c in col.cells] + [len(w) for w in str(col.header).split()] + [1])
    fixed = sum(c.width for c in numeric)

    if labels and width - fixed - overhead() < wanted and table.box:
        table.show_edge = False  # the two outer borders are worth less than a label squeezed further
    room = max(4 * len(labels), width - fixed - overhead())
    for col in labels:
        col.overflow = "fold"
        col.min_width = max(1, min(widest[id(col)], room // len(labels)))
    return table


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` fitted to the console's width; never cropped."""
    console.print(fit(table, console.width), crop=False)


def common_prefix(labels: Sequence[str]) -> str:
    """The leading folders every label shares, leaving each label at least its last part.

    Example:
        >>> common_prefix(["runs/demo/grpo/checkpoint-2", "runs/demo/grpo"])
        'runs/demo/'
    """
    parts = [str(label).split("/") for label in labels]
    if len(parts) < 2:
        return ""
    n = 0
    while all(len(p) > n + 1 for p in parts) and len({p[n] for p in parts}) == 1:
        n += 1
    return "/".join(parts[0][:n]) + "/" if n else ""


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
    print_table(console, head)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")

    sweep = Table(title="Update sparsity by tolerance (paper: Table 6; headline at 1e-05)")
    sweep.add_column("tolerance", justify="right")
    sweep.add_column("changed", justify="right")
    sweep.add_column("sparsity %", justify="right")
    sweep.add_column("density %", justify="right")
    for lab in result.labels:
        sweep.add_row(lab, f"{total.changed[lab]:,}", _pct(total.sparsity(lab)), _pct(total.density(lab)))
    print_table(console, sweep)

    labs = result.labels
    print_table(console, _sparsity_by("Sparsity % by matrix type", "type", result.by_type().items(), labs))
    if per_layer:
        rows = (("other" if layer is None else str(layer), agg) for layer, agg in result.by_layer().items())
        print_table(console, _sparsity_by("Sparsity % by layer", "layer", rows, labs))


def _sparsity_by(title: str, key: str, rows, labels: list[str]) -> Table:
    table = Table(title=title)
    table.add_column(key)
    table.add_column("params", justify="right")
    for lab in labels:
        table.add_column(f"t={lab}", justify="right")
    for name, agg in rows:
        table.add_row(name, f"{agg.numel:,}", *[_pct(agg.sparsity(lab)) for lab in labels])
    return table
