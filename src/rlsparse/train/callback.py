"""A transformers ``TrainerCallback`` over ``attach_mask``: masked training for any Trainer.

It works with every trainer built on ``transformers.Trainer`` (TRL's SFT, DPO, GRPO, RLOO, KTO,
ORPO, CPO/SimPO, OnlineDPO) because it only needs the model and optimizer the Trainer hands to
callbacks. The hooks are attached in ``on_train_begin``, which fires after ``accelerator.prepare``
(FSDP2 has swapped in DTensor parameters by then) and after a checkpoint's optimizer state is
loaded (so dense moments can be zeroed outside the mask), and before the first forward pass.
"""

from __future__ import annotations

from transformers import TrainerCallback

from rlsparse.masks import Mask
from rlsparse.train.masking import MaskHandle, _check_not_empty, attach_mask, match_parameters


class MaskCallback(TrainerCallback):
    """Train only the subnetwork in ``mask``; optionally check the rest never moved.

    Args:
        mask: the subnetwork (True = trainable).
        order: ``"after_clip"`` (default, the paper's) or ``"before_clip"``; see ``attach_mask``.
        weight_decay: ``"mask"`` (decay masked-in elements only) or ``"refuse"``.
        verify: snapshot the weights at the start and, at the end of training, raise MaskError if
            any masked-out element is not bit-identical (costs one CPU copy of the model).

    Example:
        >>> trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
        ...                      callbacks=[MaskCallback(Mask.load("sub.mask.safetensors"), verify=True)])
        >>> trainer.train()
    """

    def __init__(self, mask: Mask, order: str = "after_clip", weight_decay: str = "mask", verify: bool = False):
        self.mask = mask
        self.order = order
        self.weight_decay = weight_decay
        self.verify = verify
        self.handle: MaskHandle | None = None
        self._start = None
        self.verified: int | None = None  # masked-out elements found bit-identical (this rank), after verify

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Fail while the trainer is being built, not after minutes of data preparation.
        _check_not_empty(self.mask)
        if model is not None:
            match_parameters(model, self.mask)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.handle is not None:
            self.handle.detach()
        self.handle = attach_mask(model, self.mask, optimizer, order=self.order, weight_decay=self.weight_decay)
        self._start = self.handle.snapshot() if self.verify else None

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is None:
            return
        handle, self.handle = self.handle, None
        handle.detach()
        if self._start is not None:
            start, self._start = self._start, None
            handle.verify(start)
            self.verified = sum(int(m.frozen.sum()) for m in handle.params if m.frozen is not None)
