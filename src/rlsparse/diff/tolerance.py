"""Tolerances: a tolerance is a number; its key in results is canonical, whatever the spelling.

``1e-5``, ``"1e-5"`` and ``"1e-05"`` are one tolerance with one key, ``"1e-05"`` (``repr`` of the
float; ``"0"`` for zero), in the Python API, the JSON and the CLI alike. Results keyed by
tolerance (``ToleranceCounts``) answer to any spelling of the number.

Example:
    >>> tolerance_key("1e-5"), tolerance_key(1e-05)
    ('1e-05', '1e-05')
"""

from __future__ import annotations

from typing import Sequence

from rlsparse.errors import UsageError

PAPER_TOLERANCE = 1e-5  # the paper's |new - old| > 1e-5 (section 2.2)
PAPER_TOLERANCE_KEY = "1e-05"  # its canonical key in results
DEFAULT_TOLERANCES = (0.0, 1e-8, 1e-7, 1e-6, 1e-5)


def parse_tolerance(t: float | str, param: str = "tolerance") -> float:
    """``t`` as a float; UsageError naming ``param`` unless it is a finite number >= 0."""
    try:
        v = float(t)
    except (TypeError, ValueError):
        raise UsageError(f"{param}={t!r} is not a number; use e.g. 1e-5") from None
    if not v >= 0 or v == float("inf"):
        raise UsageError(f"{param}={t!r} must be a finite number >= 0 (0 means value inequality)")
    return v


def tolerance_key(t: float | str) -> str:
    """The canonical key of a tolerance: ``repr`` of its float value, ``"0"`` for zero."""
    v = float(t)
    return "0" if v == 0 else repr(v)


def parse_tolerances(items: Sequence[float | str], param: str = "tolerances") -> tuple[list[str], list[float]]:
    """(canonical keys, values) of ``items``, duplicates (by value) dropped, order kept."""
    keys: list[str] = []
    values: list[float] = []
    for t in items:
        v = parse_tolerance(t, param)
        if v not in values:
            keys.append(tolerance_key(v))
            values.append(v)
    if not values:
        raise UsageError(f"{param}: no tolerance given; use e.g. [0, 1e-5]")
    return keys, values


class ToleranceCounts(dict):
    """A dict keyed by canonical tolerance keys that also answers to any spelling or float."""

    def __missing__(self, key):
        try:
            canonical = tolerance_key(key)
        except (TypeError, ValueError):
            raise KeyError(key) from None
        if canonical == key or canonical not in self:
            raise KeyError(f"{key!r}: not a measured tolerance (measured: {', '.join(self)})")
        return self[canonical]

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        try:
            return dict.__contains__(self, tolerance_key(key))
        except (TypeError, ValueError):
            return False

    def get(self, key, default=None):
        return self[key] if key in self else default
