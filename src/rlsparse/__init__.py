"""rlsparse: measure, compare, train and ship the sparse subnetworks that RL finetuning updates.

Example:
    >>> import rlsparse
    >>> r = rlsparse.diff("base_model", "rl_model", mask_path="sub.mask.safetensors")
    >>> mask = rlsparse.Mask.load("sub.mask.safetensors")
"""

from __future__ import annotations

from rlsparse import diff  # callable package: rlsparse.diff(base, finetuned)
from rlsparse._version import __version__
from rlsparse.masks import Mask, load_mask

__all__ = ["Mask", "__version__", "diff", "load_mask"]
