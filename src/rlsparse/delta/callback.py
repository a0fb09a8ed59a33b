"""``DeltaSyncCallback``: sparse weight sync from any ``transformers.Trainer`` every N steps."""

from __future__ import annotations

import json

from transformers import TrainerCallback

from rlsparse.delta.sync import SyncSender


class DeltaSyncCallback(TrainerCallback):
    """Every ``every`` optimizer steps, pack what changed since the last sync and ``send`` it.

    Args:
        transport: Anything with ``send(payload: bytes)`` (see ``rlsparse.delta.transport``).
        every: Optimizer steps between syncs.
        dtype: The receivers' dtype (weights are compared in it).
        report_path: Optional JSON-lines file that gets one ``SyncReport`` per sync.

    The sender snapshots the model at ``on_train_begin``: receivers must hold those weights.

    Example:
        >>> trainer.add_callback(DeltaSyncCallback(SocketTransport.connect("localhost", 5555), every=1))
    """

    def __init__(self, transport, every: int = 1, dtype: str | None = "bf16", report_path=None, **sender_kwargs):
        if every < 1:
            from rlsparse.errors import UsageError

            raise UsageError(f"every={every}: expected a number of optimizer steps >= 1")
        self.transport = transport
        self.every = every
        self.dtype = dtype
        self.report_path = report_path
        self.sender_kwargs = sender_kwargs
        self.sender: SyncSender | None = None
        self.reports = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.sender = SyncSender(model, self.dtype, **self.sender_kwargs)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.sender is None or state.global_step % self.every:
            return
        payload, report = self.sender.sync(model)
        report.step = state.global_step
        self.transport.send(payload)
        self.reports.append(report)
        if self.report_path:
            with open(self.report_path, "a") as f:
                f.write(json.dumps(report.to_json()) + "\n")
