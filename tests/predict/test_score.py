"""Scores equal brute-force set arithmetic; the curve's tie handling equals the average over every
tie-break; top_fraction picks exactly round(density * n) elements."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsparse.errors import MismatchError
from rlsparse.masks import Mask
from rlsparse.predict import Prediction, curve, score, top_fraction

SHAPES = {"a.weight": (3, 5), "b.weight": (7,)}


def _mask(bits: list[bool]) -> Mask:
    arr = np.array(bits, dtype=bool)
    return Mask.from_tensors({"a.weight": torch.from_numpy(arr[:15].reshape(3, 5)),
                              "b.weight": torch.from_numpy(arr[15:].copy())})


bits22 = st.lists(st.booleans(), min_size=22, max_size=22)


@settings(max_examples=60, deadline=None)
@given(bits22, bits22)
def test_score_equals_set_arithmetic(p_bits, f_bits):
    P = {i for i, b in enumerate(p_bits) if b}
    F = {i for i, b in enumerate(f_bits) if b}
    s = score(_mask(p_bits), _mask(f_bits))
    assert (s.numel, s.predicted_ones, s.final_ones, s.hits) == (22, len(P), len(F), len(P & F))
    assert s.precision == (len(P & F) / len(P) if P else None)
    assert s.recall == (len(P & F) / len(F) if F else None)
    assert s.f1 == (2 * len(P & F) / (len(P) + len(F)) if P or F else None)
    assert s.overlap["jaccard"] == (len(P & F) / len(P | F) if P | F else None)
    assert s.random["precision"] == (len(F) / 22 if P else None)
    assert s.random["recall"] == (len(P) / 22 if F else None)


def _brute_expected_hits(scores: list[float], truth: list[bool], k: int) -> float:
    """Average hits in the first k over every ordering sorted by score (ties in every order)."""
    orders = [o for o in itertools.permutations(range(len(scores)))
              if all(scores[o[i]] >= scores[o[i + 1]] for i in range(len(o) - 1))]
    return sum(sum(truth[i] for i in o[:k]) for o in orders) / len(orders)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=6, max_size=6), st.lists(st.booleans(), min_size=6,
                                                                                       max_size=6))
def test_curve_hits_equal_average_over_tie_breaks(scores, truth):
    final = Mask.from_tensors({"w": torch.tensor(truth).reshape(2, 3)})
    pred = Prediction("test", {"w": np.array(scores, dtype=np.float32).reshape(2, 3)})
    c = curve(pred, final, densities=[k / 6 for k in range(7)])
    for d, k, hits in zip(c.densities, c.predicted, c.hits):
        assert k == round(d * 6)
        assert hits == pytest.approx(_brute_expected_hits(scores, truth, k), abs=1e-12)


def test_constant_scores_give_the_random_baseline_exactly():
    g = torch.Generator().manual_seed(0)
    final = Mask.from_tensors({"w": torch.rand(40, 25, generator=g) < 0.3})
    pred = Prediction("random", {"w": np.zeros((40, 25), np.float32)})
    for p in curve(pred, final).points():
        assert p["hits"] == pytest.approx(p["predicted"] * final.ones / 1000, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, float("nan")]), min_size=22, max_size=22),
       st.floats(0, 1), st.integers(0, 3))
def test_top_fraction_picks_exactly_k_and_every_higher_score(values, density, seed):
    arr = np.array(values, dtype=np.float32)
    scores = {"a.weight": arr[:15].reshape(3, 5), "b.weight": arr[15:]}
    chosen = top_fraction(scores, density, seed)
    flat = np.concatenate([chosen["a.weight"].reshape(-1), chosen["b.weight"]])
    k = int(round(density * 22))
    assert flat.sum() == k
    ranked = np.nan_to_num(arr.astype(np.float64), nan=-np.inf)
    if 0 < k < 22:  # nothing left out scores above anything taken
        assert ranked[~flat].max() <= ranked[flat].min()


def test_masks_of_different_models_are_refused():
    a = Mask.from_tensors({"w": torch.ones(2, 3, dtype=torch.bool)})
    b = Mask.from_tensors({"w": torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(MismatchError, match="same model"):
        score(a, b)
    with pytest.raises(MismatchError, match="different models"):
        curve(Prediction("x", {"v": np.zeros((2, 3), np.float32)}), a)


def test_scores_file_round_trip(tmp_path):
    pred = Prediction("adam_drift", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, 1.0, {"step": 3})
    pred.save(tmp_path / "p.scores.safetensors")
    back = Prediction.load(tmp_path / "p.scores.safetensors")
    assert (back.predictor, back.threshold, back.params) == ("adam_drift", 1.0, {"step": 3})
    assert np.array_equal(back.scores["w"], pred.scores["w"])
    assert back.mask().count("w") == 4  # 2, 3, 4, 5 > 1
