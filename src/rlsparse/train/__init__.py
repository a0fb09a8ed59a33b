"""Training: finetune only a subnetwork, as a drop-in for the trainers people already use.

``attach_mask`` works on any model and optimizer; ``MaskCallback`` puts it under any
``transformers.Trainer`` (TRL's included); ``SparseAdamW`` keeps optimizer state for the
subnetwork only. The callback needs transformers, imported on first use.
"""

from rlsparse.train.masking import MaskHandle, attach_mask, match_parameters, mask_name, verify_unchanged
from rlsparse.train.sparse_adamw import SparseAdamW

__all__ = ["MaskCallback", "MaskHandle", "SparseAdamW", "attach_mask", "mask_name", "match_parameters",
           "verify_unchanged"]


def __getattr__(name):
    # transformers is an optional extra (rlsparse[train]); import it only when the callback is asked for
    if name == "MaskCallback":
        from rlsparse.errors import require

        require("transformers", "train")
        from rlsparse.train.callback import MaskCallback

        return MaskCallback
    raise AttributeError(f"module 'rlsparse.train' has no attribute {name!r}")
