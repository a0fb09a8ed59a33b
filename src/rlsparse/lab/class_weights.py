"""KTO's class weights from the rows a cell actually trains on.

KTO weighs the losses of desirable and undesirable examples by lambda_D and lambda_U (TRL's
``KTOConfig.desirable_weight`` and ``undesirable_weight``). The KTO paper (Ethayarajh et al.
2024, Eq. 8) recommends ``lambda_D * n_D / (lambda_U * n_U)`` in [1, 4/3]; TRL warns outside it.
The lab's KTO data are the policy's distinct sampled replies, labelled desirable when correct, so
they are imbalanced by construction (at most one distinct correct reply per prompt; on the real
base about 1 desirable to 10 undesirable).

A recipe asks for ``"trl": {"desirable_weight": "balanced"}``: at run time lambda_D is set from
the counts of the built rows so that the ratio is 7/6, the middle of the recommended range (its
lower end, 1, sits on TRL's check, which rounds its bounds to two decimals). lambda_U stays at
the recipe's value (TRL's default 1). The value used is recorded with the cell's training log.
"""

from __future__ import annotations

from dataclasses import replace

from rlsparse.errors import UsageError

BALANCED = "balanced"
TARGET_RATIO = 7 / 6  # lambda_D n_D / (lambda_U n_U): the middle of the KTO paper's [1, 4/3]


def balanced_desirable_weight(n_desirable: int, n_undesirable: int, undesirable_weight: float = 1.0) -> float:
    """lambda_D such that ``lambda_D * n_desirable / (undesirable_weight * n_undesirable)`` is 7/6.

    Example:
        >>> balanced_desirable_weight(100, 1000)  # 11.666...
    """
    if n_desirable < 1 or n_undesirable < 1:
        raise UsageError(f"KTO desirable_weight 'balanced': the data has {n_desirable} desirable and {n_undesirable} "
                         "undesirable rows, expected at least one of each; use a base that is right part of the time "
                         "or set a number")
    return TARGET_RATIO * undesirable_weight * n_undesirable / n_desirable


def resolve(recipe, rows: list[dict]):
    """The recipe with a "balanced" ``desirable_weight`` replaced by its value for ``rows``.

    Returns:
        ``(recipe, record)``: ``record`` is None when the recipe did not ask for it, else
        ``{"desirable_weight", "undesirable_weight", "n_desirable", "n_undesirable", "ratio", "rule"}``.
    """
    if recipe.trl.get("desirable_weight") != BALANCED:
        return recipe, None
    n_desirable = sum(1 for r in rows if r.get("label") is True)
    n_undesirable = sum(1 for r in rows if r.get("label") is False)
    undesirable = float(recipe.trl.get("undesirable_weight", 1.0))
    weight = balanced_desirable_weight(n_desirable, n_undesirable, undesirable)
    record = {"desirable_weight": weight, "undesirable_weight": undesirable, "n_desirable": n_desirable,
              "n_undesirable": n_undesirable, "ratio": weight * n_desirable / (undesirable * n_undesirable),
              "rule": "lambda_D n_D / (lambda_U n_U) = 7/6, the middle of the KTO paper's [1, 4/3]"}
    return replace(recipe, trl={**recipe.trl, "desirable_weight": weight}), record


def check(recipe) -> str | None:
    """What is wrong with a recipe's ``desirable_weight`` (a number, or "balanced" for KTO), or None."""
    value = recipe.trl.get("desirable_weight")
    if not isinstance(value, str):
        return None
    if value != BALANCED:
        return f"trl.desirable_weight {value!r} (expected a number or {BALANCED!r})"
    if recipe.algorithm != "kto":
        return f"trl.desirable_weight {BALANCED!r} with algorithm {recipe.algorithm!r} (only KTO has class weights)"
    return None
