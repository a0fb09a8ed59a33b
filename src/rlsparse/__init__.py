"""rlsparse: measure, compare, train and ship the sparse subnetworks that RL finetuning updates.

Example:
    >>> import rlsparse
    >>> r = rlsparse.diff("base_model", "rl_model", mask_path="sub.mask.safetensors")
    >>> mask = rlsparse.Mask.load("sub.mask.safetensors")
"""

from __future__ import annotations

__version__ = "0.1.0"

from rlsparse import diff  # noqa: E402  (callable package: rlsparse.diff(base, finetuned))
from rlsparse.masks import Mask, load_mask  # noqa: E402

__all__ = ["Mask", "__version__", "diff", "load_mask"]
