"""The lab's statistics against hand-computed and brute-force values."""

import itertools
import math

import numpy as np
import pytest

from rlsparse.lab import stats


def test_a_five_point_gain_is_not_dropped_by_rounding():
    gain = 0.6 - 0.55  # 0.04999999999999993
    assert not gain >= 0.05  # the bare comparison the lab used to make
    assert stats.at_least(gain, 0.05)
    assert not stats.at_least(0.0499, 0.05)
    assert not stats.at_least(float("nan"), 0.0) and not stats.at_least(None, 0.0)
    assert stats.exceeds(0.051, 0.05) and not stats.exceeds(gain, 0.05)


def test_value_at_level_interpolates_between_the_bracketing_points():
    curve = [(-0.01, 0.9), (0.0, 0.6), (0.2, 0.2)]  # (gain, sparsity) by learning rate
    # 0.6 + (0.2 - 0.6) * (0.1 - 0.0) / (0.2 - 0.0)
    assert stats.value_at_level(curve, 0.1) == pytest.approx(0.4, abs=1e-15)
    assert stats.value_at_level(curve, -0.05) == 0.9  # reached at the first point
    assert stats.value_at_level(curve, 0.5) is None  # never reached
    assert stats.value_at_level([(0.0, 0.8), (0.6 - 0.55, 0.5)], 0.05) == pytest.approx(0.5)
    # the first crossing counts, not a later one
    assert stats.value_at_level([(0.0, 1.0), (0.2, 0.0), (0.0, 0.5), (0.3, 0.2)], 0.1) == pytest.approx(0.5)
    # a point without a gain breaks the curve: no interpolation across it
    assert stats.value_at_level([(0.0, 1.0), (None, 0.7), (0.2, 0.0)], 0.1) == 0.0


def test_std_error_by_hand():
    assert stats.std_error([1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(3))
    assert stats.std_error([0.5]) == 0.0
    assert stats.mean([1.0, float("nan"), 3.0]) == 2.0


def _exact_quantile(values, q):
    """The smallest value whose share of equally likely outcomes at or below it reaches q."""
    ordered = sorted(values)
    return ordered[math.ceil(q * len(ordered)) - 1]


def test_bootstrap_matches_the_enumerated_distribution():
    sample = [1.0, 2.0, 4.0]
    exact = [float(np.mean(r)) for r in itertools.product(sample, repeat=3)]  # all 27 resamples
    obs, lo, hi = stats.bootstrap([sample], lambda g: float(g[0].mean()), resamples=20000, level=0.95, seed=1)
    assert obs == pytest.approx(7 / 3)
    # min and max each have probability 1/27 > 2.5%: the 95% interval is exactly [1, 4]
    assert (lo, hi) == (_exact_quantile(exact, 0.025), _exact_quantile(exact, 0.975)) == (1.0, 4.0)
    _, lo50, hi50 = stats.bootstrap([sample], lambda g: float(g[0].mean()), resamples=20000, level=0.5, seed=1)
    assert lo50 == pytest.approx(_exact_quantile(exact, 0.25))
    assert hi50 == pytest.approx(_exact_quantile(exact, 0.75))


def test_bootstrap_of_two_groups_resamples_each_within_itself():
    obs, lo, hi = stats.bootstrap([[1.0, 1.0], [3.0, 3.0]], lambda g: float(g[1].mean() - g[0].mean()))
    assert (obs, lo, hi) == (2.0, 2.0, 2.0)  # no spread inside a group: no interval


def test_count_wins_by_hand():
    pairs = [([0.8, 0.8], [0.1, 0.1]), ([0.5], [0.49]), ([0.1], [0.5])]
    t = stats.count_wins(pairs, margin=0.02)
    assert (t["wins"], t["losses"], t["ties"], t["n"]) == (1, 1, 1, 3)
    assert t["wins_interval"] == [1.0, 1.0] and t["losses_interval"] == [1.0, 1.0]
    # a difference of exactly the margin is a tie, also after rounding
    assert stats.count_wins([([0.6], [0.55])], margin=0.05)["ties"] == 1
    noisy = stats.count_wins([([0.9, 0.1, 0.5], [0.45, 0.45, 0.45])], margin=0.0, resamples=4000)
    assert noisy["wins"] == 1 and noisy["wins_interval"] == [0.0, 1.0]
    assert stats.count_wins([], margin=0.0)["n"] == 0


def test_count_wins_intervals_are_those_of_one_bootstrap_per_tally():
    """Wins and losses share one pass over the resamples: each interval is exactly what a bootstrap of
    that tally alone gives (same seed, same groups, so the same resamples)."""
    pairs = [([0.9, 0.1, 0.5], [0.45, 0.4, 0.5]), ([0.2, 0.3], [0.25, 0.2, 0.4]), ([0.7], [0.69])]
    groups = [g for a, b in pairs for g in (a, b)]
    t = stats.count_wins(pairs, margin=0.01, resamples=500, seed=3)

    def tally(sign):
        return lambda arrs: float(sum(sign * (arrs[2 * i].mean() - arrs[2 * i + 1].mean()) > 0.01 + stats.GAIN_TOLERANCE
                                      for i in range(len(pairs))))

    wins = stats.bootstrap(groups, tally(1), resamples=500, seed=3)
    losses = stats.bootstrap(groups, tally(-1), resamples=500, seed=3)
    assert (t["wins"], *t["wins_interval"]) == (int(wins[0]), wins[1], wins[2])
    assert (t["losses"], *t["losses_interval"]) == (int(losses[0]), losses[1], losses[2])
