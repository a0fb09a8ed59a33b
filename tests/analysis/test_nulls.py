"""The magnitude-stratified overlap null equals a brute-force expectation over every redraw."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from rlsparse.analysis.nulls import exponent_cells, stratified_intersections
from rlsparse.analysis.overlap import overlap
from rlsparse.errors import MismatchError
from rlsparse.masks import Mask

# Base values in three binades (bf16 exponents differ), two tensors.
VALUES = [0.011, 0.013, 0.3, 0.26, 0.27, 3.0, 2.5, 0.012]


def _brute(cells: dict[str, np.ndarray], a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Average |A' ∩ B| over every A' with A's count in each (tensor, exponent) cell."""
    per_tensor = []
    for name, c in cells.items():
        options = []
        for cell in np.unique(c):
            idx = np.flatnonzero(c == cell)
            count = int(a[name][idx].sum())
            options.append([sum(int(b[name][i]) for i in pick) for pick in itertools.combinations(idx, count)])
        # independent cells: the mean of a sum is the sum of the means
        per_tensor.append(sum(sum(o) / len(o) for o in options))
    return sum(per_tensor)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=14, max_size=14), st.lists(st.booleans(), min_size=14, max_size=14),
       st.permutations(list(range(8))))
def test_stratified_expectation_equals_brute_force(tmp_path_factory, a_bits, b_bits, perm):
    folder = tmp_path_factory.mktemp("base")
    vals = torch.tensor([VALUES[i] for i in perm] + [VALUES[i] * -1 for i in perm[:6]], dtype=torch.float32)
    save_file({"x.weight": vals[:8].to(torch.bfloat16).reshape(2, 4), "y.weight": vals[8:].to(torch.bfloat16)},
              str(folder / "model.safetensors"))
    a = np.array(a_bits)
    b = np.array(b_bits)
    ma = Mask.from_tensors({"x.weight": torch.from_numpy(a[:8].reshape(2, 4)), "y.weight": torch.from_numpy(a[8:])})
    mb = Mask.from_tensors({"x.weight": torch.from_numpy(b[:8].reshape(2, 4)), "y.weight": torch.from_numpy(b[8:])})
    cells = exponent_cells(folder / "model.safetensors")
    e = stratified_intersections([ma, mb], folder / "model.safetensors")
    want = _brute(cells, {"x.weight": a[:8], "y.weight": a[8:]}, {"x.weight": b[:8], "y.weight": b[8:]})
    assert e[0, 1] == pytest.approx(want, abs=1e-9)
    assert e[1, 0] == pytest.approx(want, abs=1e-9)  # symmetric: redrawing B gives the same
    assert (e[0, 0], e[1, 1]) == (a.sum(), b.sum())


def test_exponent_cells_are_the_bf16_exponent_field(tmp_path):
    t = torch.tensor([1.0, 2.0, 3.0, 0.5, -1.0], dtype=torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    assert exponent_cells(tmp_path / "m.safetensors")["w"].tolist() == [127, 128, 128, 126, 127]


def test_overlap_json_carries_both_nulls(tmp_path):
    t = torch.tensor([0.01, 0.02, 1.0, 1.5, 3.0, 0.011], dtype=torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    a = Mask.from_tensors({"w": torch.tensor([1, 1, 0, 0, 0, 0])})
    b = Mask.from_tensors({"w": torch.tensor([1, 0, 0, 0, 0, 1])})
    doc = overlap([a, b], labels=["a", "b"], base=tmp_path / "m.safetensors").to_json()
    pair = doc["pairs"][0]
    # cells: {0.01, 0.011} exponent 120, {0.02} 121, {1.0, 1.5} 127, {3.0} 128
    # A has 1 of 2 in cell 120 (B has 2 there) and 1 of 1 in cell 121 (B has 0): E = 1 * 2 / 2 + 0
    assert pair["intersection_stratified"] == pytest.approx(1.0)
    assert pair["o1_stratified"] == pytest.approx(0.5)
    assert pair["o1_random"] == pytest.approx(2 / 6)


def test_base_of_another_model_is_refused(tmp_path):
    save_file({"v": torch.zeros(3, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    a = Mask.from_tensors({"w": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(MismatchError, match="does not match the masks"):
        stratified_intersections([a, a], tmp_path / "m.safetensors")


def test_cli_overlap_base_adds_the_stratified_null(tmp_path, capsys):
    import json

    from rlsparse.cli.main import main

    t = torch.tensor([0.01, 0.02, 1.0, 1.5, 3.0, 0.011], dtype=torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    Mask.from_tensors({"w": torch.tensor([1, 1, 0, 0, 0, 0])}).save(tmp_path / "a.mask")
    Mask.from_tensors({"w": torch.tensor([1, 0, 0, 0, 0, 1])}).save(tmp_path / "b.mask")
    rc = main(["overlap", str(tmp_path / "a.mask"), str(tmp_path / "b.mask"), "--base", str(tmp_path / "m.safetensors"),
               "--json", str(tmp_path / "o.json")])
    assert rc == 0 and "o1 strat" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text())["pairs"][0]["intersection_stratified"] == pytest.approx(1.0)
    rc = main(["overlap", "--from-checkpoints", "a", "b", "c", "d", "--base", "m"])
    err = capsys.readouterr().err
    assert rc == 2 and "--base applies to mask files" in err and err.count("\n") == 1
