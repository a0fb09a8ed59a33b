"""rlsparse: measure, compare, train and ship the sparse subnetworks that RL finetuning updates.

Example:
    >>> import rlsparse
    >>> r = rlsparse.diff("base_model", "rl_model", mask_path="sub.mask.safetensors")
    >>> mask = rlsparse.Mask.load("sub.mask.safetensors")
"""

from __future__ import annotations

from rlsparse._version import __version__  # a leaf module: no import cycle

__all__ = ["Mask", "__version__", "diff", "load_mask"]


def __getattr__(name: str):
    # Loaded on first use: `rlsparse` on the command line imports this package before it can
    # catch Ctrl-C, so the package itself must cost nothing (numpy and friends load later).
    if name == "diff":
        import importlib

        return importlib.import_module("rlsparse.diff")  # a callable package: rlsparse.diff(base, finetuned)
    if name in ("Mask", "load_mask"):
        from rlsparse import masks

        return getattr(masks, name)
    raise AttributeError(f"module 'rlsparse' has no attribute {name!r}")
