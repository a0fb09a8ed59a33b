"""Sparsity along training, in both number formats, from the live fp32 master weights.

Two views of the same run (lab-notes: separate the number format from the optimisation):

- ``bf16``: the share of elements whose bf16-rounded value is within the tolerance of the start,
  i.e. the sparsity a bf16 checkpoint saved at that step would show (the paper's view);
- ``fp32``: the share of fp32 master weights the optimiser has not moved at all.
"""

from __future__ import annotations

from rlsparse.lab.measure import PAPER_TOLERANCE


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def sparsity_trace(model, total_steps: int, points: int = 10, tolerance: str = PAPER_TOLERANCE):
    """A ``TrainerCallback`` recording both sparsity views every ``total_steps / points`` steps.

    The callback's ``trace`` attribute is a list of {"step", "bf16", "fp32"} dicts; step 0 is
    the start. It keeps one fp32 copy of the starting weights.

    Example:
        >>> cb = sparsity_trace(model, total_steps=300)
        >>> trainer = SFTTrainer(..., callbacks=[cb]); trainer.train(); cb.trace[-1]
    """
    import torch

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    start_bf16 = {n: t.to(torch.bfloat16).to(torch.float32) for n, t in start.items()}
    every = max(1, total_steps // max(1, points))
    tol = float(tolerance)

    def measure(step: int) -> dict:
        numel = moved = changed = 0
        with torch.no_grad():
            for n, p in model.named_parameters():
                now = p.detach()
                numel += now.numel()
                moved += int((now != start[n]).sum())
                rounded = now.to(torch.bfloat16).to(torch.float32)
                changed += int(((rounded - start_bf16[n]).abs() > tol).sum())
        return {"step": step, "bf16": 1 - changed / numel, "fp32": 1 - moved / numel}

    class _Trace(_callback_base()):
        def __init__(self):
            self.trace = [measure(0)]

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 and state.global_step != self.trace[-1]["step"]:
                self.trace.append(measure(state.global_step))

        def on_train_end(self, args, state, control, **kwargs):
            if state.global_step != self.trace[-1]["step"]:
                self.trace.append(measure(state.global_step))

    return _Trace()
