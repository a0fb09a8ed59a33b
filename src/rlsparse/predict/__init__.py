"""Predict the final subnetwork of a run from early evidence, and score predictions.

Predictors (each a ``Prediction``: scores per element and, where it has one, a natural
threshold): ``early.from_checkpoints`` (the mask at step k, union / vote over the first
checkpoints, or another, cheaper run), ``optimizer.from_optimizer`` (AdamW moments at step k),
``baselines.from_precision`` (bf16 spacing only) and ``baselines.uniform`` (chance).
``score.score`` compares a predicted mask with the final one.
"""

from rlsparse.predict.baselines import from_precision, uniform
from rlsparse.predict.early import checkpoint_at, from_checkpoints, run_checkpoints
from rlsparse.predict.optimizer import from_optimizer, load_moments
from rlsparse.predict.prediction import Prediction, top_fraction
from rlsparse.predict.score import Curve, PredictionScore, curve, score

__all__ = ["Curve", "Prediction", "PredictionScore", "checkpoint_at", "curve", "from_checkpoints", "from_optimizer",
           "from_precision", "load_moments", "run_checkpoints", "score", "top_fraction", "uniform"]
