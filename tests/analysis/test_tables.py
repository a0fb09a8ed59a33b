"""Tables at 80 columns (what a pipe gets): every number whole, labels wrapped, shared folders
stripped from path labels."""

from __future__ import annotations

import re
from io import StringIO

from rich.console import Console

from _build import base_model, bump, random_choice, write
from rlsparse.analysis.overlap import overlap
from rlsparse.analysis.series import series
from rlsparse.analysis.tables import overlap_tables, series_tables
from rlsparse.diff import diff
from rlsparse.report.tables import common_prefix, diff_tables

DEEP = "experiments/2026-11-28/very-long-run-name-for-the-grpo-sweep"


def _render(fn, result, **kw) -> str:
    console = Console(width=80, file=StringIO(), color_system=None)
    fn(result, console, **kw)
    return console.file.getvalue()


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d[\d,]*\.?\d*", text))


def test_common_prefix_keeps_a_last_part_for_every_label():
    assert common_prefix(["runs/demo/grpo/checkpoint-2", "runs/demo/grpo"]) == "runs/demo/"
    assert common_prefix(["/a/b/x.mask", "/a/b/y.mask"]) == "/a/b/"
    assert common_prefix(["x.mask", "y.mask"]) == ""
    assert common_prefix(["only/one"]) == ""


def _run(tmp_path):
    base, sd = base_model(tmp_path)
    root = tmp_path / DEEP
    s1 = bump(sd, random_choice(sd, 0.3, seed=1))
    s2 = bump(s1, random_choice(sd, 0.2, seed=2), amount=0.5)
    c1 = write(s1, base, root / "checkpoint-2")
    c2 = write(s2, base, root / "checkpoint-4")
    return base, c1, c2


def test_overlap_table_at_80_columns_shows_every_number(tmp_path):
    base, c1, c2 = _run(tmp_path)
    m1, m2 = c1.parent / "first-subnetwork.mask.safetensors", c2.parent / "second-subnetwork.mask.safetensors"
    diff(base, c1, mask_path=m1)
    diff(base, c2, mask_path=m2)
    result = overlap([m1, m2])
    text = _render(overlap_tables, result)
    assert "…" not in text
    assert [(len(line), line) for line in text.splitlines() if len(line) > 80] == []
    t = result.pairs[0].total
    expected = {f"{t.numel:,}"} | {f"{100 * x:.2f}" for x in (t.sparsity_a, t.sparsity_b, t.o1, t.o1_random, t.o2,
                                                              t.o2_random, t.jaccard)}
    assert expected <= _numbers(text)
    joined = text.replace("\n", "")
    assert f"inputs (under {c1.parent}/): [1] first-subnetwork.mask.safetensors  [2] second-subnetwork" in joined
    assert "│ 1 | 2 " in text


def test_series_table_strips_the_shared_folders(tmp_path):
    base, c1, c2 = _run(tmp_path)
    result = series(base, [c1, c2])
    text = _render(series_tables, result)
    assert "…" not in text
    rows = [line for line in text.splitlines() if "checkpoint-" in line and "│" in line]
    assert [r.split("│")[1].strip() for r in rows] == ["checkpoint-2", "checkpoint-4"]
    assert {f"{100 * x:.2f}" for x in result.sparsity} <= _numbers(text)


def test_diff_tables_at_80_columns_show_every_number(tmp_path):
    base, c1, _ = _run(tmp_path)
    result = diff(base, c1, tolerances=["0", "1e-8", "1e-7", "1e-6", "1e-5", "1e-4", "1e-3"])
    text = _render(diff_tables, result)
    assert "…" not in text
    numbers = _numbers(text)
    assert {f"{result.total.changed[lab]:,}" for lab in result.labels} <= numbers
    for name, agg in result.by_type().items():
        assert {f"{agg.numel:,}"} | {f"{100 * agg.sparsity(lab):.2f}" for lab in result.labels} <= numbers, name
