"""How well a predicted subnetwork matches the final one.

For a predicted mask P and the final mask F over n elements: precision ``|P ∩ F| / |P|``
(the overlap o1 of P with F), recall ``|P ∩ F| / |F|`` (o2), F1, Jaccard. The random baseline is
a uniformly random P of the same size: expected precision ``|F| / n``, expected recall
``|P| / n`` (Appendix E's), and with ``base`` also the magnitude-stratified baseline
(``analysis.nulls``).

From a predictor's scores, the precision-recall curve over densities: the top ``k`` elements by
score for each ``k``. Ties are broken uniformly at random and the curve holds the *expected*
hits, computed exactly (a tie group straddling the cut contributes its hit rate times the
number taken from it), so a constant score gives the random baseline exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from rlsparse.analysis.overlap import overlap
from rlsparse.errors import MismatchError
from rlsparse.masks import Mask
from rlsparse.predict.prediction import Prediction

SCHEMA_VERSION = 1
# Densities of the curve: log-spaced from 0.01% to 100%, plus the final mask's density.
CURVE_DENSITIES = tuple(float(x) for x in np.unique(np.round(np.logspace(-4, 0, 41), 8)))


def prf(hits: float, predicted: float, final: float) -> dict:
    """Precision, recall and F1 from (expected) counts; None where undefined."""
    p = hits / predicted if predicted else None
    r = hits / final if final else None
    f1 = 2 * hits / (predicted + final) if predicted + final else None
    return {"precision": p, "recall": r, "f1": f1}


def random_prf(predicted: int, final: int, numel: int) -> dict:
    """Expected precision, recall and F1 of a uniformly random mask of ``predicted`` elements."""
    hits = predicted * final / numel if numel else 0.0
    return {"precision": final / numel if predicted and numel else None,
            "recall": predicted / numel if final and numel else None,
            "f1": 2 * hits / (predicted + final) if predicted + final else None}


@dataclass
class Curve:
    """Expected hits of the top-k elements by score, at each density (``k = round(d * n)``)."""

    numel: int
    final: int
    densities: list[float]
    predicted: list[int]
    hits: list[float]

    def points(self) -> list[dict]:
        out = []
        for d, k, h in zip(self.densities, self.predicted, self.hits):
            out.append({"density": d, "predicted": k, "hits": h, **prf(h, k, self.final),
                        "random": random_prf(k, self.final, self.numel)})
        return out

    def at(self, density: float) -> dict:
        """The curve's point nearest ``density``."""
        i = int(np.argmin([abs(d - density) for d in self.densities]))
        return self.points()[i]


def curve(prediction: Prediction, final: Mask, densities=CURVE_DENSITIES) -> Curve:
    """The precision-recall curve of a predictor's scores against the final mask.

    Example:
        >>> c = curve(Prediction.load("adam.scores.safetensors"), Mask.load("final.mask.safetensors"))
        >>> c.at(final.density)["recall"]
    """
    _check_same(prediction, final)
    names = final.names
    scores = np.concatenate([np.nan_to_num(prediction.scores[n].reshape(-1).astype(np.float64), nan=-np.inf)
                             for n in names])
    truth = np.concatenate([final.get(n).numpy().reshape(-1) for n in names])
    n = scores.size
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    ends = np.append(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1, n)  # end of each tie group
    cum_hits = np.cumsum(truth[order], dtype=np.int64)[ends - 1]
    del order, ordered
    ds = sorted(set(float(d) for d in densities) | {final.density})
    ks = [int(round(d * n)) for d in ds]
    hits = [_expected_hits(k, ends, cum_hits) for k in ks]
    return Curve(n, int(truth.sum()), ds, ks, hits)


def _expected_hits(k: int, ends: np.ndarray, cum_hits: np.ndarray) -> float:
    if k <= 0:
        return 0.0
    g = int(np.searchsorted(ends, k))  # the tie group holding the k-th element
    start = int(ends[g - 1]) if g else 0
    before = int(cum_hits[g - 1]) if g else 0
    size = int(ends[g]) - start
    return before + (k - start) * (int(cum_hits[g]) - before) / size


def _check_same(prediction: Prediction, final: Mask) -> None:
    shapes = {n: list(s.shape) for n, s in prediction.scores.items()}
    if shapes != {n: list(final.shape(n)) for n in final.names}:
        from rlsparse.errors import tensor_set_differences

        parts = tensor_set_differences(shapes, final.meta.shapes, "the prediction", "the final mask")
        raise MismatchError("the prediction and the final mask are of different models: " + "; ".join(parts)
                            + "; predict from checkpoints of the run the final mask came from")


@dataclass
class PredictionScore:
    """A predicted mask scored against the final one (and its curve, when scores were given).

    Example:
        >>> s = score("union@15.mask.safetensors", "final.mask.safetensors")
        >>> s.recall, s.random["recall"]
    """

    predicted: str
    final: str
    numel: int
    predicted_ones: int
    final_ones: int
    hits: int
    overlap: dict
    curve: Curve | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float | None:
        return prf(self.hits, self.predicted_ones, self.final_ones)["precision"]

    @property
    def recall(self) -> float | None:
        return prf(self.hits, self.predicted_ones, self.final_ones)["recall"]

    @property
    def f1(self) -> float | None:
        return prf(self.hits, self.predicted_ones, self.final_ones)["f1"]

    @property
    def random(self) -> dict:
        """Expected precision/recall/F1 of a uniformly random mask of the predicted size."""
        return random_prf(self.predicted_ones, self.final_ones, self.numel)

    @property
    def stratified(self) -> dict | None:
        e = self.overlap.get("intersection_stratified")
        return None if e is None else prf(e, self.predicted_ones, self.final_ones)

    def to_json(self) -> dict:
        from rlsparse import __version__

        return {
            "schema_version": SCHEMA_VERSION, "kind": "predict-score",
            "tool": {"name": "rlsparse", "version": __version__},
            "definitions": {
                "precision": "|P ∩ F| / |P| (o1 of the prediction with the final mask)",
                "recall": "|P ∩ F| / |F| (o2)", "f1": "2 |P ∩ F| / (|P| + |F|)",
                "random": "expected values for a uniformly random P of the same size",
                "stratified": "expected values for P redrawn at random within each tensor x bf16-exponent cell",
                "curve": "top round(density * n) elements by score; ties broken at random, expected hits exact",
            },
            "predicted": self.predicted, "final": self.final, "numel": self.numel,
            "predicted_ones": self.predicted_ones, "final_ones": self.final_ones, "intersection": self.hits,
            "density": {"predicted": self.predicted_ones / self.numel, "final": self.final_ones / self.numel},
            "precision": self.precision, "recall": self.recall, "f1": self.f1, "random": self.random,
            "stratified": self.stratified, "overlap": self.overlap,
            "curve": None if self.curve is None else self.curve.points(), "notes": list(self.notes),
        }


def score(predicted: str | os.PathLike | Mask, final: str | os.PathLike | Mask, *,
          prediction: Prediction | None = None, base: str | os.PathLike | None = None,
          densities=CURVE_DENSITIES) -> PredictionScore:
    """Score a predicted mask against the final mask.

    Args:
        predicted: The predicted subnetwork (mask file or Mask).
        final: The final subnetwork of the run (mask file or Mask).
        prediction: The predictor's scores, for the precision-recall curve over densities.
        base: The base checkpoint, for the magnitude-stratified random baseline.
        densities: Densities of the curve.

    Raises:
        MismatchError: the masks (or the scores) are of different models.

    Example:
        >>> s = score("pred.mask.safetensors", "final.mask.safetensors")
        >>> print(f"recall {s.recall:.1%} vs random {s.random['recall']:.1%}")
    """
    pm = predicted if isinstance(predicted, Mask) else Mask.load(predicted)
    fm = final if isinstance(final, Mask) else Mask.load(final)
    fm.check_compatible(pm, "the final and the predicted masks")
    labels = ["predicted", "final"]
    result = overlap([pm, fm], labels=labels, base=base)
    pair = result.to_json()["pairs"][0]
    pair = {k: v for k, v in pair.items() if k not in ("a", "b", "by_layer", "by_type")}
    c = curve(prediction, fm, densities) if prediction is not None else None
    return PredictionScore(str(pm.path or "predicted"), str(fm.path or "final"), pair["numel"], pair["changed_a"],
                           pair["changed_b"], pair["intersection"], pair, c)
