"""Lossless sparse patches of finetuned models, and sparse weight sync for RL trainers.

``pack`` codes a finetuned checkpoint against its base (only what changed, entropy-coded);
``apply`` rebuilds it bit for bit; ``SyncSender`` / ``SyncReceiver`` ship the same patches
between a trainer and its inference copies every few steps. The format is in ``format.py``.
"""

from rlsparse.delta.apply import apply, apply_to_module, apply_to_state_dict
from rlsparse.delta.format import Manifest, PatchReader
from rlsparse.delta.inspect import inspect
from rlsparse.delta.pack import pack
from rlsparse.delta.sync import SyncReceiver, SyncReport, SyncSender

__all__ = ["pack", "apply", "apply_to_state_dict", "apply_to_module", "inspect", "Manifest", "PatchReader",
           "SyncSender", "SyncReceiver", "SyncReport"]


def __getattr__(name: str):
    # transformers is heavy: the callback is imported only when asked for
    if name == "DeltaSyncCallback":
        from rlsparse.delta.callback import DeltaSyncCallback

        return DeltaSyncCallback
    raise AttributeError(name)
