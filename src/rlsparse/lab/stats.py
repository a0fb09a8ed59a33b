"""The statistics behind the lab's verdicts: tolerant comparisons, interpolation at a matched
level, seed means and percentile bootstrap intervals.

Gains are differences of accuracies (k/n fractions), so a +5.0-point gain is often stored as
0.04999999999999993: every threshold comparison goes through ``at_least`` with an absolute
tolerance far below one problem (1/n), never a bare ``>=`` on floats.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

GAIN_TOLERANCE = 1e-9


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def at_least(value, threshold: float, tol: float = GAIN_TOLERANCE) -> bool:
    """``value >= threshold`` up to ``tol`` (False for None or NaN).

    Example:
        >>> at_least(0.6 - 0.55, 0.05)
        True
    """
    return _finite(value) and value >= threshold - tol


def exceeds(value, threshold: float, tol: float = GAIN_TOLERANCE) -> bool:
    """``value > threshold`` by more than ``tol`` (False for None or NaN)."""
    return _finite(value) and value > threshold + tol


def mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if _finite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def std_error(xs: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for a single value."""
    xs = [x for x in xs if _finite(x)]
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def value_at_level(points: Sequence[tuple[float, float]], level: float, tol: float = GAIN_TOLERANCE) -> float | None:
    """The value where a curve first reaches ``level``, linear in the level between the bracketing points.

    Args:
        points: (level reached, value) pairs in the curve's order (e.g. by learning rate, or by
            step): e.g. (accuracy gain, sparsity).
        level: The level to match (e.g. +0.10 accuracy gain).
        tol: Comparison tolerance on the level.

    Returns:
        The interpolated value, the first point's value if it already reaches the level, or None
        if the curve never does.

    Example:
        >>> value_at_level([(0.0, 0.8), (0.2, 0.4)], 0.1)
        0.6000000000000001
    """
    prev = None
    for lvl, val in points:
        if not _finite(lvl) or not _finite(val):
            prev = None
            continue
        if at_least(lvl, level, tol):
            if prev is None or lvl == prev[0] or abs(lvl - level) <= tol:
                return val  # reached here (up to rounding): no extrapolation past the point
            l0, v0 = prev
            return v0 + (val - v0) * (level - l0) / (lvl - l0)
        prev = (lvl, val)
    return None


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` interval of a bootstrap distribution (percentile method)."""
    lo = (1 - level) / 2
    return float(np.quantile(values, lo)), float(np.quantile(values, 1 - lo))


def bootstrap(groups: Sequence[Sequence[float]], statistic: Callable[[list[np.ndarray]], float], *,
              resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap of a statistic of several independent groups (each resampled within itself).

    Args:
        groups: Samples, e.g. the per-seed sparsities of each (recipe, learning rate) cell.
        statistic: Maps one resampled list of arrays (same order as ``groups``) to a number.
        resamples: Bootstrap draws.
        level: Coverage of the interval.
        seed: Seed of the resampling.

    Returns:
        (observed statistic, interval low, interval high).

    Example:
        >>> bootstrap([[1.0, 2.0, 3.0]], lambda g: float(g[0].mean()))[0]
        2.0
    """
    return _bootstrap_all(groups, [statistic], resamples=resamples, level=level, seed=seed)[0]


def _bootstrap_all(groups, statistics, *, resamples: int, level: float, seed: int) -> list[tuple[float, float, float]]:
    """``bootstrap`` of several statistics over the same resamples: each one's result is the one
    ``bootstrap`` gives it alone (the resamples depend only on the groups' sizes and the seed)."""
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    observed = [statistic(arrays) for statistic in statistics]
    rng = np.random.default_rng(seed)
    draws = np.empty((len(statistics), resamples))
    for i in range(resamples):
        drawn = [a[rng.integers(0, len(a), len(a))] if len(a) else a for a in arrays]
        for k, statistic in enumerate(statistics):
            draws[k, i] = statistic(drawn)
    return [(obs, *percentile_interval(d, level)) for obs, d in zip(observed, draws)]


def count_wins(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], margin: float = 0.0, *,
               resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """"A is larger than B at k of n matched points", with a bootstrap interval on k.

    Each pair holds the per-seed values of A and of B at one matched point. A point counts as a
    win when mean(A) - mean(B) exceeds ``margin``, a loss when it is below ``-margin``, a tie
    otherwise. Seeds are resampled within each cell.

    Returns:
        {"wins", "losses", "ties", "n", "wins_interval": [lo, hi], "losses_interval": [lo, hi]}.
    """
    groups = [g for a, b in pairs for g in (a, b)]

    def tally(sign: int):
        def stat(arrs):
            return float(sum(sign * (arrs[2 * i].mean() - arrs[2 * i + 1].mean()) > margin + GAIN_TOLERANCE
                             for i in range(len(pairs))))
        return stat

    if not pairs:
        return {"wins": 0, "losses": 0, "ties": 0, "n": 0, "wins_interval": [0, 0], "losses_interval": [0, 0]}
    # Wins and losses over the same resamples: one pass draws them once.
    (w, wlo, whi), (l, llo, lhi) = _bootstrap_all(groups, [tally(1), tally(-1)], resamples=resamples, level=level,
                                                 seed=seed)
    return {"wins": int(w), "losses": int(l), "ties": len(pairs) - int(w) - int(l), "n": len(pairs),
            "wins_interval": [wlo, whi], "losses_interval": [llo, lhi]}
