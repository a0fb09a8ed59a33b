"""Error types a user can act on.

Every message says what was found, what was expected and how to fix it. The CLI turns these
into one line on stderr and a non-zero exit code, without a traceback.
"""

from __future__ import annotations


class RlsparseError(Exception):
    """Base class for errors caused by user input (files, options), not by bugs."""

    exit_code = 2


class CheckpointError(RlsparseError):
    """A checkpoint path is missing, unreadable, truncated or not in a known layout."""


class MismatchError(RlsparseError):
    """Two inputs that must describe the same model do not (names, shapes, dtypes)."""


class MaskError(RlsparseError):
    """A mask file is not ours, is corrupt, or does not fit the model it is applied to."""


class PatchError(RlsparseError):
    """A delta patch is not ours, is truncated or corrupt, or comes from a newer rlsparse."""


class OutputError(RlsparseError):
    """An output path cannot be written."""


class UsageError(RlsparseError):
    """Options that contradict each other or are out of range."""


class WorkerError(RlsparseError):
    """A worker process died (killed by a signal, out of memory) before its work was done."""


class MissingDependencyError(RlsparseError):
    """An optional dependency is not installed; the message carries the install hint."""


def tensor_set_differences(a: dict, b: dict, label_a: str, label_b: str) -> list[str]:
    """Phrases naming how two ``{tensor name: shape}`` maps differ (empty when they agree), for
    one MismatchError that lists every problem."""
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    shapes = sorted(n for n in set(a) & set(b) if list(a[n]) != list(b[n]))
    parts = []
    if only_a:
        parts.append(f"{len(only_a)} tensors only in {label_a} (e.g. {only_a[:3]})")
    if only_b:
        parts.append(f"{len(only_b)} tensors only in {label_b} (e.g. {only_b[:3]})")
    if shapes:
        n = shapes[0]
        parts.append(f"{len(shapes)} shapes differ (e.g. {n}: {list(a[n])} vs {list(b[n])})")
    return parts


def require(module: str, extra: str):
    """Import an optional dependency or fail with the exact install hint.

    Example:
        >>> trl = require("trl", "train")
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module} is not installed (needed here: {exc}); install it with "
            f"`pip install 'rlsparse[{extra}]'`"
        ) from None
