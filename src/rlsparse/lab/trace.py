"""Sparsity along training, in both number formats, from the live fp32 master weights.

Two views of the same run (lab-notes: separate the number format from the optimisation):

- ``bf16``: the share of elements whose bf16-rounded value is within the tolerance of the start,
  i.e. the sparsity a bf16 checkpoint saved at that step would show (the paper's view);
- ``fp32``: the share of fp32 master weights the optimiser has not moved at all.

It also accumulates, per weight, the path length sum_t |Δ_t| of the fp32 master weights over every
optimiser step, so that the net-drift ratio |sum_t Δ_t| / sum_t |Δ_t| (1 = every step pushed the
weight the same way; near 0 = the steps cancelled) can be compared between RL and SFT.

And the paper's checkpoint-series figures, read in the bf16 view at every optimiser step (as if a
checkpoint were saved after each one; the paper saved fewer):

- Figure 2: every element is *never updated* (its bf16 value within the tolerance of the start
  after every step), *cancelled* (moved at some step, back within the tolerance at the end) or in
  the *final* subnetwork;
- Figure 6: at each traced step, the share of all elements changed then but not in the final
  subnetwork;
- Figure 7(b): per step, the share of elements whose bf16 value moved by more than the tolerance
  in that one step (the sparsity of consecutive checkpoints, i and i + 1).
"""

from __future__ import annotations

from rlsparse.lab.measure import PAPER_TOLERANCE


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


# Parameters are traced in buckets of consecutive tensors, each flattened into one vector: a tiny
# model's step costs ~10 tensor operations per bucket instead of per parameter (the per-operation
# overhead was most of the trace's cost), while a bucket's temporaries stay small on a large model.
# Counts use ``count_nonzero``: the same integers as a bool ``sum``, about 4x faster on CPU.
BUCKET_ELEMENTS = 1 << 22


def _buckets(params: dict) -> list[list[tuple[str, int]]]:
    """Runs of consecutive parameters of one dtype, as (name, numel), of at most ``BUCKET_ELEMENTS``
    elements (a larger tensor alone)."""
    buckets: list[list[tuple[str, int]]] = []
    size, dtype = 0, None
    for name, p in params.items():
        if not buckets or size + p.numel() > BUCKET_ELEMENTS or p.dtype != dtype:
            buckets.append([])
            size, dtype = 0, p.dtype
        buckets[-1].append((name, p.numel()))
        size += p.numel()
    return buckets


def sparsity_trace(model, total_steps: int, points: int = 10, tolerance: str = PAPER_TOLERANCE, also=()):
    """A ``TrainerCallback`` recording both sparsity views every ``total_steps / points`` steps
    (and at the steps in ``also``, e.g. where checkpoints are saved).

    The callback's ``trace`` attribute is a list of {"step", "bf16", "fp32"} dicts; step 0 is
    the start. After training, ``drift`` is {"net_over_path": sum_i |net_i| / sum_i path_i,
    "mean_ratio": mean over moved weights of |net_i| / path_i, "moved": weights with path > 0}.
    After training, ``series`` is {"numel", "never", "cancelled", "final", "ever",
    "outside_final": [{"step", "share"}], "per_step": [{"step", "share"}]} (Figures 2, 6 and
    7(b); see the module docstring).

    It keeps two copies of the weights in their training dtype (start, previous step), one fp32
    (the path length), two bf16 (the start and the previous step rounded to bf16), one bool per weight
    (ever changed) and one bit per weight at each traced step. Each step rounds the weights to
    bf16 once: the previous step's rounding is kept, and a traced step's measurement reuses the one
    its step just made.

    Example:
        >>> cb = sparsity_trace(model, total_steps=300)
        >>> trainer = SFTTrainer(..., callbacks=[cb]); trainer.train(); cb.trace[-1]
    """
    import numpy as np
    import torch

    live = dict(model.named_parameters())
    buckets = _buckets(live)
    shapes = {n: p.shape for n, p in live.items()}

    def flat(bucket, params) -> torch.Tensor:
        """The bucket's current weights as one new vector (torch.cat always copies)."""
        return torch.cat([params[n].detach().reshape(-1) for n, _ in bucket])

    start = [flat(b, live) for b in buckets]
    # Roundings are kept in bf16 (half the memory of fp32) and compared in fp32: torch widens a bf16
    # operand of an fp32 subtraction exactly, so the differences are those of the fp32 values.
    start_bf16 = [t.to(torch.bfloat16, copy=True) for t in start]
    every = max(1, total_steps // max(1, points))
    extra = frozenset(also)
    tol = float(tolerance)

    prev = [t.clone() for t in start]
    prev_bf16 = list(start_bf16)  # the weights after the last accumulated step, rounded to bf16
    # The path length is summed in fp32 whatever the weights' dtype: a bf16 sum stops growing once it
    # is 2^8 times a step (a pure-bf16 run's one-ULP steps would vanish from it).
    path = [torch.zeros(t.shape, dtype=torch.float32) for t in start]
    ever = [torch.zeros(t.shape, dtype=torch.bool) for t in start]
    numel = sum(t.numel() for t in start)
    per_step: list[dict] = []
    changed_at: dict[int, list] = {}  # traced step -> packed bits per bucket of the elements changed then (Figure 6)

    def accumulate(step: int) -> None:
        moved = 0
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, bucket in enumerate(buckets):
                now = flat(bucket, params)
                rounded_bf16 = now.to(torch.bfloat16)  # a new tensor even for bf16 weights: `now` is a copy
                rounded = rounded_bf16.float()
                moved += int(torch.count_nonzero((rounded - prev_bf16[k]).abs() > tol))
                ever[k] |= (rounded - start_bf16[k]).abs() > tol
                path[k] += (now.float() - prev[k].float()).abs()
                prev[k], prev_bf16[k] = now, rounded_bf16
        per_step.append({"step": step, "share": moved / numel})

    def changed_now(k: int) -> torch.Tensor:
        # Called after ``accumulate`` of the same step: its rounding is these weights'.
        return (prev_bf16[k].float() - start_bf16[k]).abs() > tol

    def series() -> dict:
        """Figures 2, 6 and 7(b) from what was recorded (call after the last step)."""
        total_ever = cancelled = final = 0
        outside = {s: 0 for s in changed_at}
        for k in range(len(buckets)):
            now = changed_now(k)  # the last step's: the final weights
            total_ever += int(torch.count_nonzero(ever[k]))
            final += int(torch.count_nonzero(now))
            cancelled += int(torch.count_nonzero(ever[k] & ~now))
            off = np.packbits(~now.numpy())
            for s, packed in changed_at.items():
                outside[s] += int(np.unpackbits(packed[k] & off).sum())
        return {"numel": numel, "never": numel - total_ever, "cancelled": cancelled, "final": final,
                "ever": total_ever, "outside_final": [{"step": s, "share": outside[s] / numel} for s in sorted(outside)],
                "per_step": list(per_step)}

    def drift() -> dict:
        # Summed tensor by tensor, each in a tensor of its own, as the numbers were always summed.
        net_sum = path_sum = ratio_sum = 0.0
        moved = 0
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, bucket in enumerate(buckets):
                offset = 0
                for n, size in bucket:
                    begin = start[k][offset:offset + size].view(shapes[n])
                    net = (params[n].detach().float() - begin.float()).abs().double()
                    walk = path[k][offset:offset + size].view(shapes[n]).double()
                    offset += size
                    net_sum += float(net.sum())
                    path_sum += float(walk.sum())
                    live_ = walk > 0
                    moved += int(live_.sum())
                    ratio_sum += float((net[live_] / walk[live_]).sum())
        return {"net_over_path": net_sum / path_sum if path_sum else float("nan"),
                "mean_ratio": ratio_sum / moved if moved else float("nan"), "moved": moved}

    def measure(step: int) -> dict:
        moved = changed = 0
        bits = []
        with torch.no_grad():
            for k in range(len(buckets)):
                moved += int(torch.count_nonzero(prev[k] != start[k]))  # prev: these weights (accumulated this step)
                differs = changed_now(k)
                changed += int(torch.count_nonzero(differs))
                bits.append(np.packbits(differs.numpy()))
        if step > 0:
            changed_at[step] = bits
        return {"step": step, "bf16": 1 - changed / numel, "fp32": 1 - moved / numel}

    class _Trace(_callback_base()):
        def __init__(self):
            self.trace = [measure(0)]
            self.drift = self.series = None

        def on_step_end(self, args, state, control, **kwargs):
            accumulate(state.global_step)
            due = state.global_step % every == 0 or state.global_step in extra
            if due and state.global_step != self.trace[-1]["step"]:
                self.trace.append(measure(state.global_step))

        def on_train_end(self, args, state, control, **kwargs):
            if state.global_step != self.trace[-1]["step"]:
                self.trace.append(measure(state.global_step))
            self.drift = drift()
            self.series = series()

    return _Trace()
